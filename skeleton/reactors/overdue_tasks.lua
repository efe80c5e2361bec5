--[[
overdue_tasks: a reminder. A reactor turns events into commands; this one
marks a task overdue when it is still open a while after it was opened.

  TaskOpened    -> schedule MarkOverdue at +overdue_seconds, key "overdue:<id>"
  TaskCompleted -> cancel that schedule (a done task is never overdue)

A schedule survives a restart of the daemon (it is kept beside the store), and
a late MarkOverdue is refused by the Task aggregate's own rules, so the
reactor needs no state of its own. Every .lua file in reactors/ is a reactor.

overdue_seconds is a setting, one day by default; the environment variable
EBB_REACTOR_OVERDUE_TASKS_OVERDUE_SECONDS overrides it (e.g. 60 to try it).
]]
local r = { name = "overdue_tasks", from = { "Task" },
            settings = { overdue_seconds = 86400 } }

local function key(e) return "overdue:" .. e.aggregate_id end

r.on = {
  TaskOpened = function(e, ctx)
    -- counted from the event's recorded_at: a redelivery sets the same time
    ctx.schedule(ctx.settings.overdue_seconds,
                 { aggregate = "Task", id = e.aggregate_id, type = "MarkOverdue" }, key(e))
    return {}
  end,
  TaskCompleted = function(e, ctx)
    ctx.cancel(key(e))
    return {}
  end,
}

return r
