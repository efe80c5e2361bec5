-- The Task aggregate's rules, as given/when/then scenarios (ebb.testing):
-- given these past events, when this command arrives, expect these new
-- events (or this rejection) and this state. Run them with `ebb test`.
local t = require "ebb.testing"
local task = require "task"

describe("Task", function()
  it("opens with a title", function()
    t.scenario(task, "t-1")
      :when("OpenTask", { title = "Water the plants" })
      :expect_events { { type = "TaskOpened", data = { title = "Water the plants" } } }
      :expect_state { status = "open", title = "Water the plants" }
  end)

  it("needs a title", function()
    t.scenario(task, "t-1")
      :when("OpenTask", { title = "" })
      :expect_rejection "title is required"
  end)

  it("is opened once", function()
    t.scenario(task, "t-1")
      :given { { type = "TaskOpened", data = { title = "Water the plants" } } }
      :when("OpenTask", { title = "Again" })
      :expect_rejection("task already exists", { status = "open" })
  end)

  it("completes once it is open", function()
    t.scenario(task, "t-1")
      :given { { type = "TaskOpened", data = { title = "Water the plants" } } }
      :when("CompleteTask")
      :expect_events { { type = "TaskCompleted" } }
      :expect_state { status = "done" }
  end)

  it("is not completed twice", function()
    t.scenario(task, "t-1")
      :given {
        { type = "TaskOpened", data = { title = "Water the plants" } },
        { type = "TaskCompleted", data = {} },
      }
      :when("CompleteTask")
      :expect_rejection "task is already done"
  end)

  it("is not completed before it exists", function()
    t.scenario(task, "t-1"):when("CompleteTask"):expect_rejection "task does not exist"
  end)

  it("becomes overdue while it is open, and can still be completed", function()
    t.scenario(task, "t-1")
      :given { { type = "TaskOpened", data = { title = "Water the plants" } } }
      :when("MarkOverdue")
      :expect_events { { type = "TaskOverdue" } }
      :expect_state { status = "overdue" }
    t.scenario(task, "t-1")
      :given {
        { type = "TaskOpened", data = { title = "Water the plants" } },
        { type = "TaskOverdue", data = {} },
      }
      :when("CompleteTask")
      :expect_events { { type = "TaskCompleted" } }
      :expect_state { status = "done" }
  end)

  it("is not overdue once done, nor twice, nor before it exists", function()
    t.scenario(task, "t-1")
      :given {
        { type = "TaskOpened", data = { title = "Water the plants" } },
        { type = "TaskCompleted", data = {} },
      }
      :when("MarkOverdue")
      :expect_rejection("only an open task becomes overdue", { status = "done" })
    t.scenario(task, "t-1")
      :given {
        { type = "TaskOpened", data = { title = "Water the plants" } },
        { type = "TaskOverdue", data = {} },
      }
      :when("MarkOverdue")
      :expect_rejection("only an open task becomes overdue", { status = "overdue" })
    t.scenario(task, "t-1"):when("MarkOverdue"):expect_rejection "task does not exist"
  end)
end)
