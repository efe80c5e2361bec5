-- The overdue_tasks reactor: given events, expect the commands it sends now
-- and the ones it schedules for later (ebb.testing's t.reactor; the daemon
-- is not needed). Events are recorded at t.NOW unless they say otherwise.
local t = require "ebb.testing"
local overdue_tasks = require "overdue_tasks"

local function opened(id, at)
  return { stream = "Task-" .. id, type = "TaskOpened", data = { title = "Water the plants" },
           recorded_at = at }
end

describe("overdue_tasks", function()
  it("schedules MarkOverdue a day after a task is opened, and sends nothing now", function()
    t.reactor(overdue_tasks)
      :given { opened("t-1", "2026-01-01T09:00:00.000Z") }
      :expect_commands {}
      :expect_schedules {
        { key = "overdue:t-1", at = "2026-01-02T09:00:00.000Z",
          command = { aggregate = "Task", id = "t-1", type = "MarkOverdue", data = {} } },
      }
  end)

  it("cancels the reminder of a task completed in time, and only that one", function()
    t.reactor(overdue_tasks)
      :given { opened("t-1", "2026-01-01T09:00:00.000Z"), opened("t-2", "2026-01-01T10:00:00.000Z") }
      :given { { stream = "Task-t-1", type = "TaskCompleted" } }
      :expect_commands {}
      :expect_schedules { { key = "overdue:t-2", at = "2026-01-02T10:00:00.000Z" } }
  end)
end)
