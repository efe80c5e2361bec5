--[[
open_tasks: the tasks not done yet, for a to-do list. A projection keeps a
read model (its own SQLite database) up to date from the events it reads
(`from`: stream categories or event types). Bump `version` when the tables
change: the read model is then rebuilt from the first event.

    GET /projections/open_tasks/list
]]
local p = { name = "open_tasks", version = 1, from = { "Task" } }

function p.setup(db)
  db:exec [[
    CREATE TABLE tasks (
      id        TEXT PRIMARY KEY,   -- the task's id (its stream is Task-<id>)
      title     TEXT NOT NULL,
      opened_at TEXT NOT NULL
    );
  ]]
end

local function id_of(e) return (e.stream:gsub("^Task%-", "")) end

p.on = {
  TaskOpened = function(db, e)
    db:exec("INSERT INTO tasks (id, title, opened_at) VALUES (?, ?, ?)",
            id_of(e), e.data.title, e.recorded_at)
  end,
  TaskCompleted = function(db, e)
    db:exec("DELETE FROM tasks WHERE id = ?", id_of(e))
  end,
}

p.queries = {
  -- list: the open tasks, oldest first
  list = function(db)
    return db:rows("SELECT id, title, opened_at FROM tasks ORDER BY opened_at, id")
  end,
}

return p
