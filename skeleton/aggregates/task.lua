--[[
Task: something to do, opened with a title and completed once.
Stream "Task-<id>". Change it, or add modules next to it: every .lua file in
aggregates/ is an aggregate (its `type` names it in commands).

The rules: a task needs a non-empty title; it is opened once; only an open
task can be completed, and only once; only an open task becomes overdue (the
reactor reactors/overdue_tasks.lua sends MarkOverdue when a task stays open
too long), and an overdue task can still be completed.
]]
local ebb = require "ebb"

local task = { type = "Task" }

function task.initial()
  return { status = "none", title = "" }
end

-- Decisions: a command's handler checks the rules against the state and
-- returns the events that record what happened, or rejects the command.
task.handle = {}

function task.handle.OpenTask(s, c)
  if s.status ~= "none" then ebb.reject("task already exists", { status = s.status }) end
  local title = c.data.title
  if type(title) ~= "string" or title == "" then ebb.reject("title is required") end
  return { { type = "TaskOpened", data = { title = title } } }
end

function task.handle.CompleteTask(s)
  if s.status == "none" then ebb.reject("task does not exist") end
  if s.status == "done" then ebb.reject("task is already done") end
  return { { type = "TaskCompleted", data = {} } }
end

function task.handle.MarkOverdue(s)
  if s.status == "none" then ebb.reject("task does not exist") end
  if s.status ~= "open" then ebb.reject("only an open task becomes overdue", { status = s.status }) end
  return { { type = "TaskOverdue", data = {} } }
end

-- Evolution: how each event changes the state (no rules here: events are facts).
task.apply = {
  TaskOpened = function(s, e)
    s.status = "open"
    s.title = e.data.title
  end,
  TaskCompleted = function(s)
    s.status = "done"
  end,
  TaskOverdue = function(s)
    s.status = "overdue"
  end,
}

return task
