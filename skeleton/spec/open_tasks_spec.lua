-- The open_tasks projection: events in, query answers out, on a read model
-- in a temporary file (ebb.testing's t.projection).
local t = require "ebb.testing"
local open_tasks = require "open_tasks"

describe("open_tasks", function()
  local p
  before_each(function() p = t.projection(open_tasks) end)
  after_each(function() p:close() end)

  it("lists the tasks not done yet, oldest first", function()
    p:given {
      { stream = "Task-t-1", type = "TaskOpened", data = { title = "Water the plants" },
        recorded_at = "2026-01-01T09:00:00.000Z" },
      { stream = "Task-t-2", type = "TaskOpened", data = { title = "Buy bread" },
        recorded_at = "2026-01-01T10:00:00.000Z" },
      { stream = "Task-t-1", type = "TaskCompleted" },
    }
    assert.are.same({
      { id = "t-2", title = "Buy bread", opened_at = "2026-01-01T10:00:00.000Z" },
    }, p:query("list"))
  end)

  it("is empty before any task", function()
    assert.are.same({}, p:query("list"))
  end)
end)
