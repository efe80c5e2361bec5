-- The db handle of projections (runtime/projection_db.c) through ebb.core:
-- exec, row, rows and value with every parameter and column type, errors,
-- the statement cache, the row bound, and everything the handle refuses
-- (ATTACH, PRAGMA, transactions, VACUUM, the runner's _ebb_ tables, writes
-- from queries). The runner's own use of the connection is stood in for by
-- `runner_sql`, which runs on the connection directly, as the runner does.
local core = require "ebb.core"
local support = require "support"

local failure, contains = support.failure, support.contains

-- The checkpoint table as the runner makes it.
local CHECKPOINT = "CREATE TABLE _ebb_checkpoint (id INTEGER PRIMARY KEY, position INTEGER NOT NULL);"
  .. "CREATE INDEX _ebb_checkpoint_position ON _ebb_checkpoint (position);"
  .. "INSERT INTO _ebb_checkpoint VALUES (1, 42);"

describe("projection db", function()
  local db

  before_each(function()
    db = assert(core.projection_db(":memory:"))
    db:exec "CREATE TABLE t (a INTEGER, b TEXT)"
  end)

  after_each(function()
    db:close()
  end)

  describe("exec", function()
    it("returns the rows changed, and 0 for statements that change none", function()
      assert.are.equal(1, db:exec("INSERT INTO t VALUES (?, ?)", 1, "x"))
      assert.are.equal(2, db:exec "INSERT INTO t SELECT a + 1, b FROM t UNION ALL SELECT a + 2, b FROM t")
      assert.are.equal(2, db:exec("UPDATE t SET b = ? WHERE a > ?", "y", 1))
      -- SQLite keeps the last count across other statements: exec does not.
      assert.are.equal(0, db:exec "CREATE INDEX t_a ON t (a)")
      assert.are.equal(0, db:exec "SELECT * FROM t")
      assert.are.equal(0, db:exec("UPDATE t SET b = 'z' WHERE a = ?", 99))
      assert.are.equal(3, db:exec "DELETE FROM t")
    end)

    it("runs a text of several statements without parameters, and returns the sum", function()
      local n = db:exec [[
        CREATE TABLE orders (id TEXT PRIMARY KEY, total INTEGER NOT NULL DEFAULT 0); -- the table
        CREATE INDEX orders_total ON orders (total);
        /* two rows */ INSERT INTO orders (id) VALUES ('o-1');
        INSERT INTO orders (id) VALUES ('o-2');;
      ]]
      assert.are.equal(2, n)
      assert.are.equal(2, db:value "SELECT count(*) FROM orders")
    end)

    it("refuses parameters with several statements", function()
      local err = failure(db.exec, db, "INSERT INTO t VALUES (?, 'x'); INSERT INTO t VALUES (2, 'y')", 1)
      contains(err, "db:exec: parameters can only be bound to a single statement, and the text has several")
      -- also when the slots are in a later statement and no values are given
      err = failure(db.exec, db, "INSERT INTO t VALUES (1, 'x'); INSERT INTO t VALUES (?, 'y')")
      contains(err, "parameters can only be bound to a single statement")
      assert.are.equal(1, db:value "SELECT count(*) FROM t") -- the first one ran: the runner's transaction undoes it
    end)

    it("stops at the first failing statement and names it", function()
      local err = failure(db.exec, db, "CREATE TABLE a (x); INSERT INTO nope VALUES (1); CREATE TABLE b (x)")
      contains(err, 'db:exec: no such table: nope (in "INSERT INTO nope VALUES (1); CREATE TABLE b (x)")')
      assert.are.equal(1, db:value "SELECT count(*) FROM sqlite_schema WHERE name = 'a'")
      assert.are.equal(0, db:value "SELECT count(*) FROM sqlite_schema WHERE name = 'b'")
    end)

    it("refuses a text without a statement, or with a NUL byte", function()
      contains(failure(db.exec, db, "  -- nothing\n"), "db:exec: no SQL statement in the text")
      contains(failure(db.exec, db, "SELECT 1\0; DROP TABLE t"), "db:exec: the SQL text contains a NUL byte")
      assert.are.equal(0, db:value "SELECT count(*) FROM t")
    end)
  end)

  describe("row, rows and value", function()
    before_each(function()
      for i = 1, 3 do db:exec("INSERT INTO t VALUES (?, ?)", i, "v" .. i) end
    end)

    it("row gives the first row as a table, or nil", function()
      assert.are.same({ a = 2, b = "v2" }, db:row("SELECT * FROM t WHERE a >= ? ORDER BY a", 2))
      assert.is_nil(db:row("SELECT * FROM t WHERE a = ?", 9))
    end)

    it("rows gives every row, in order, as a JSON array", function()
      local rows = db:rows("SELECT a, b FROM t WHERE a <= ?2 AND b IS NOT ?1 ORDER BY a DESC", "v9", 2)
      assert.are.same({ { a = 2, b = "v2" }, { a = 1, b = "v1" } }, rows)
      assert.are.equal("array", getmetatable(rows).__jsontype)
      local text = core.json_encode(rows)
      assert.matches("^%[{.*}%]$", text)
      assert.are.same(rows, core.json_decode(text))
    end)

    it("rows gives an empty array, which encodes as []", function()
      local rows = db:rows("SELECT * FROM t WHERE a > ?", 100)
      assert.are.equal(0, #rows)
      assert.are.equal("[]", core.json_encode(rows))
    end)

    it("value gives the first column of the first row, or nil for no row and for NULL", function()
      assert.are.equal(3, db:value "SELECT count(*) FROM t")
      assert.are.equal("v3", db:value "SELECT b FROM t ORDER BY a DESC")
      assert.is_nil(db:value("SELECT b FROM t WHERE a = ?", 9))
      assert.is_nil(db:value "SELECT max(a) FROM t WHERE a > 100")
    end)

    it("runs one statement only", function()
      for _, m in ipairs { "row", "rows", "value" } do
        local err = failure(db[m], db, "SELECT 1; SELECT 2")
        contains(err, "db:" .. m .. ": the text has several statements; this method runs one")
      end
    end)

    it("also runs writes, RETURNING included", function()
      assert.are.same({ a = 10, b = "new" }, db:row("INSERT INTO t VALUES (?, ?) RETURNING *", 10, "new"))
      assert.are.same({ { a = 10 } }, db:rows("DELETE FROM t WHERE a = ? RETURNING a", 10))
    end)
  end)

  describe("parameters", function()
    local function roundtrip(v)
      return db:row("SELECT ? AS v, typeof(?1) AS type", v)
    end

    it("binds integers as exact 64-bit integers", function()
      for _, v in ipairs { 0, -1, 42, math.maxinteger, math.mininteger, 9007199254740993 } do
        local r = roundtrip(v)
        assert.are.equal("integer", r.type)
        assert.are.equal("integer", math.type(r.v))
        assert.are.equal(v, r.v)
      end
      db:exec("INSERT INTO t (a) VALUES (?)", math.maxinteger)
      assert.are.equal(math.maxinteger, db:value("SELECT a FROM t WHERE a = ?", math.maxinteger))
    end)

    it("binds floats as REAL, and they come back as floats", function()
      for _, v in ipairs { 0.5, -1e300, 1.0, 2.0 ^ 63, -0.0, 1 / 3 } do
        local r = roundtrip(v)
        assert.are.equal("real", r.type)
        assert.are.equal("float", math.type(r.v))
        assert.are.equal(v, r.v)
      end
    end)

    it("binds strings as TEXT with their length: unicode and NUL bytes", function()
      for _, v in ipairs { "", "plain", "ünïcødé ✓ 𝄞 日本", "a\0b", "\0", ("x"):rep(100000) } do
        local r = db:row("SELECT ? AS v, typeof(?1) AS type, length(CAST(?1 AS BLOB)) AS bytes", v)
        assert.are.equal("text", r.type)
        assert.are.equal(#v, r.bytes)
        assert.are.equal(v, r.v)
      end
      db:exec("INSERT INTO t (b) VALUES (?)", "a\0b")
      assert.are.equal("a\0b", db:value("SELECT b FROM t WHERE b = ?", "a\0b"))
    end)

    it("binds strings that are not UTF-8 as BLOBs, byte for byte", function()
      for _, v in ipairs { "\xff\xfe", "abc\xc3", "\xed\xa0\x80", "\xc0\xaf" } do
        local r = roundtrip(v)
        assert.are.equal("blob", r.type)
        assert.are.equal(v, r.v)
      end
    end)

    it("binds booleans as 1 and 0, and nil and the JSON null as NULL", function()
      assert.are.same({ v = 1, type = "integer" }, roundtrip(true))
      assert.are.same({ v = 0, type = "integer" }, roundtrip(false))
      assert.are.same({ v = core.null, type = "null" }, roundtrip(nil))
      assert.are.same({ v = core.null, type = "null" }, roundtrip(core.null))
      db:exec("INSERT INTO t VALUES (?, ?)", nil, core.null)
      assert.are.equal(1, db:value "SELECT count(*) FROM t WHERE a IS NULL AND b IS NULL")
    end)

    it("refuses values it cannot bind, naming the parameter", function()
      contains(failure(db.exec, db, "INSERT INTO t VALUES (?, ?)", 1, {}),
        'db:exec: parameter 2: cannot bind a table (in "INSERT INTO t VALUES (?, ?)")')
      contains(failure(db.value, db, "SELECT ?", print), "db:value: parameter 1: cannot bind a function")
      contains(failure(db.rows, db, "SELECT ?", coroutine.create(print)), "parameter 1: cannot bind a thread")
      contains(failure(db.row, db, "SELECT ?", db), "parameter 1: cannot bind a userdata")
      -- the statement was left unbound and reset: it runs again
      assert.are.equal(1, db:exec("INSERT INTO t VALUES (?, ?)", 1, "x"))
    end)

    it("refuses too many or too few parameters", function()
      contains(failure(db.exec, db, "INSERT INTO t VALUES (?, ?)", 1, "x", 3),
        "db:exec: the statement takes 2 parameters, but 3 were given")
      contains(failure(db.exec, db, "INSERT INTO t VALUES (?, ?)", 1),
        "db:exec: the statement takes 2 parameters, but 1 was given")
      contains(failure(db.value, db, "SELECT 1", 1), "db:value: the statement takes 0 parameters, but 1 was given")
      contains(failure(db.value, db, "SELECT ?"), "the statement takes 1 parameter, but 0 were given")
      assert.are.equal(0, db:value "SELECT count(*) FROM t")
    end)

    it("counts ?NNN parameters up to the largest number, and binds them by it", function()
      assert.are.same({ x = "a", y = "a", z = 3 }, db:row("SELECT ?1 AS x, ?1 AS y, ?3 AS z", "a", "unused", 3))
      contains(failure(db.value, db, "SELECT ?3", 1), "takes 3 parameters, but 1 was given")
      assert.are.equal(7, db:value("SELECT :n + ?", 3, 4)) -- named slots bind by position too
    end)
  end)

  describe("columns", function()
    it("come back by type: integer, float, string, blob, and NULL as the JSON null", function()
      local r = db:row "SELECT 7 AS i, 1.5 AS f, 2.0 AS g, 'tëxt' AS s, x'00ff41' AS b, x'' AS e, NULL AS n"
      assert.are.equal("integer", math.type(r.i))
      assert.are.equal(7, r.i)
      assert.are.equal("float", math.type(r.f))
      assert.are.equal(1.5, r.f)
      assert.are.equal("float", math.type(r.g))
      assert.are.equal("tëxt", r.s)
      assert.are.equal("\0\255A", r.b)
      assert.are.equal("", r.e)
      assert.are.equal(core.null, r.n)
      assert.are.equal(core.null, db:rows("SELECT NULL AS n")[1].n)
    end)

    it("keep NULL columns when encoded as JSON", function()
      assert.are.equal('{"n":null}', core.json_encode(db:row "SELECT NULL AS n"))
      assert.are.equal('[{"n":null}]', core.json_encode(db:rows "SELECT NULL AS n"))
    end)

    it("are named as SQLite names them; the last of two equal names wins", function()
      assert.are.same({ ["count(*)"] = 0, total = 0 }, db:row "SELECT count(*), 0 AS total FROM t")
      assert.are.same({ x = 2 }, db:row "SELECT 1 AS x, 2 AS x")
    end)
  end)

  describe("errors", function()
    it("name the method, SQLite's message and the SQL", function()
      local err = failure(db.exec, db, "INSERT INTO orderz VALUES (?)", 1)
      contains(err, 'db:exec: no such table: orderz (in "INSERT INTO orderz VALUES (?)")')
      contains(failure(db.rows, db, "SELEC 1"), 'db:rows: near "SELEC": syntax error (in "SELEC 1")')
    end)

    it("carry the caller's position", function()
      local ok, err = pcall(function() return db:value "SELECT nope" end)
      assert.is_false(ok)
      assert.matches("projection_db_spec%.lua:%d+: db:value: no such column: nope", err)
    end)

    it("show the SQL on one line and cut it after 200 bytes", function()
      local sql = "SELECT nope,\n\n   " .. ("é"):rep(150)
      local err = failure(db.value, db, sql)
      local shown = err:match('%(in "(.*)"%)$')
      assert.are.equal("SELECT nope, " .. ("é"):rep(93) .. "...", shown)
      assert.is_true(utf8.len(shown) ~= nil)
    end)

    it("from a step leave the handle usable", function()
      db:exec "CREATE TABLE u (k TEXT PRIMARY KEY)"
      db:exec("INSERT INTO u VALUES (?)", "a")
      contains(failure(db.exec, db, "INSERT INTO u VALUES (?)", "a"), "db:exec: UNIQUE constraint failed: u.k")
      assert.are.equal(1, db:exec("INSERT INTO u VALUES (?)", "b"))
    end)

    it("in the middle of rows leave no statement running", function()
      db:exec "INSERT INTO t (a) VALUES (1), (2), (3), (4)"
      local sql = "SELECT CASE WHEN a = 3 THEN abs(-9223372036854775807 - 1) ELSE a END AS v FROM t ORDER BY a"
      for _ = 1, 3 do contains(failure(db.rows, db, sql), "db:rows: integer overflow") end
      contains(failure(db.row, db, "SELECT abs(-9223372036854775807 - 1)"), "db:row: integer overflow")
      -- a statement still running would hold the table: DROP would fail with "table is locked"
      assert.are.equal(0, db:exec "DROP TABLE t")
    end)

    it("on a closed handle say so, for every method", function()
      db:close()
      db:close() -- harmless twice
      assert.are.equal("ebb.db (closed)", tostring(db))
      for _, m in ipairs { "exec", "row", "rows", "value", "begin", "commit", "rollback" } do
        contains(failure(db[m], db, "SELECT 1"), "db:" .. m .. ": this db handle is closed")
      end
    end)

    it("when a method is called with a dot", function()
      contains(failure(db.exec, "SELECT 1"), "db:exec: call it on a db handle, with a colon: db:exec(...)")
      contains(failure(db.exec, setmetatable({}, {}), "SELECT 1"), "call it on a db handle")
      contains(failure(db.rows, io.stdout, "SELECT 1"), "call it on a db handle")
    end)
  end)

  describe("the handle itself", function()
    it("hides its metatable", function()
      assert.is_false(getmetatable(db))
    end)

    it("says its mode and how many statements it keeps", function()
      assert.are.equal("ebb.db (write, 1 cached)", tostring(db)) -- the CREATE TABLE of before_each
      local r = assert(core.projection_db(":memory:", "read"))
      assert.are.equal("ebb.db (read, 0 cached)", tostring(r))
      r:close()
    end)

    it("is closed by <close>", function()
      local outer
      do
        local d <close> = assert(core.projection_db(":memory:"))
        outer = d
        assert.are.equal(1, d:value "SELECT 1")
      end
      contains(failure(outer.value, outer, "SELECT 1"), "this db handle is closed")
    end)

    it("refuses an unknown mode and reports a file it cannot open", function()
      assert.has_error(function() core.projection_db(":memory:", "sometimes") end)
      local ok, msg, code = core.projection_db("/nonexistent-dir/x/model.db")
      assert.is_nil(ok)
      assert.are.equal("storage_error", code)
      contains(msg, "cannot open /nonexistent-dir/x/model.db")
    end)

    it("drives transactions with begin, commit and rollback", function()
      db:begin()
      db:exec("INSERT INTO t VALUES (?, ?)", 1, "x")
      db:rollback()
      assert.are.equal(0, db:value "SELECT count(*) FROM t")
      db:begin()
      db:exec("INSERT INTO t VALUES (?, ?)", 1, "x")
      contains(failure(db.begin, db), "db:begin: cannot start a transaction within a transaction")
      db:commit()
      assert.are.equal(1, db:value "SELECT count(*) FROM t")
      contains(failure(db.commit, db), "db:commit: cannot commit - no transaction is active")
    end)
  end)

  describe("the statement cache", function()
    it("runs the same statement many times", function()
      db:begin()
      for i = 1, 5000 do db:exec("INSERT INTO t VALUES (?, ?)", i, "x") end
      db:commit()
      assert.are.equal(5000, db:value "SELECT count(*) FROM t")
      assert.are.equal(5000 * 5001 // 2, db:value "SELECT sum(a) FROM t")
    end)

    it("keeps working after the schema changes under a cached statement", function()
      db:exec("INSERT INTO t VALUES (?, ?)", 1, "x")
      assert.are.same({ { a = 1, b = "x" } }, db:rows "SELECT * FROM t")
      db:exec "ALTER TABLE t ADD COLUMN c INTEGER NOT NULL DEFAULT 5"
      assert.are.same({ { a = 1, b = "x", c = 5 } }, db:rows "SELECT * FROM t")
      db:exec "DROP TABLE t"
      db:exec "CREATE TABLE t (z TEXT)"
      db:exec("INSERT INTO t VALUES (?)", "new")
      assert.are.same({ { z = "new" } }, db:rows "SELECT * FROM t")
    end)

    it("keeps working after another connection changed the schema", function()
      local path = os.tmpname()
      local a = assert(core.projection_db(path))
      a:exec "CREATE TABLE t (x INTEGER)"
      a:exec("INSERT INTO t VALUES (?)", 1)
      assert.are.same({ { x = 1 } }, a:rows "SELECT * FROM t")
      local b = assert(core.projection_db(path))
      b:exec "ALTER TABLE t ADD COLUMN y TEXT DEFAULT 'b'"
      b:close()
      assert.are.same({ { x = 1, y = "b" } }, a:rows "SELECT * FROM t")
      a:close()
      os.remove(path)
    end)

    it("keeps statements up to its bound and prepares evicted ones again", function()
      for round = 1, 3 do
        for i = 1, 200 do
          -- 200 distinct texts, more than the cache holds
          assert.are.equal(i * round, db:value("SELECT ? * " .. i, round))
        end
      end
      for i = 200, 1, -1 do assert.are.equal(i, db:value("SELECT ? * " .. i, 1)) end
      assert.are.equal("ebb.db (write, 64 cached)", tostring(db))
    end)

    it("does not keep texts of several statements", function()
      db:exec "CREATE TABLE a (x); CREATE TABLE b (x)"
      assert.are.equal("ebb.db (write, 1 cached)", tostring(db))
    end)

    it("carries no value from one call into the next", function()
      assert.are.equal("a", db:value("SELECT ?", "a"))
      assert.is_nil(db:value("SELECT ?", nil))
      assert.are.equal(2, db:value("SELECT ?", 2))
    end)
  end)

  describe("the row bound", function()
    it("refuses more than 100,000 rows, and a LIMIT gets them", function()
      db:exec [[
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100001)
        INSERT INTO t (a) SELECT i FROM n
      ]]
      local err = failure(db.rows, db, "SELECT a FROM t")
      contains(err, 'db:rows: more than 100000 rows: add a LIMIT (with OFFSET to page through), '
        .. 'or use db:row or db:value (in "SELECT a FROM t")')
      local rows = db:rows("SELECT a FROM t ORDER BY a LIMIT ? OFFSET ?", 100000, 1)
      assert.are.equal(100000, #rows)
      assert.are.equal(2, rows[1].a)
      assert.are.equal(100001, rows[100000].a)
      -- the refused statement was reset: nothing holds the table
      assert.are.equal(0, db:exec "DROP TABLE t")
    end)
  end)

  describe("refuses", function()
    local function refused(d, sql, part, ...)
      local err = failure(d.exec, d, sql, ...)
      contains(err, "not authorized: " .. part)
      return err
    end

    it("ATTACH and DETACH", function()
      local err = refused(db, "ATTACH ':memory:' AS other", "projections may not use ATTACH: a projection has only "
        .. "its own database")
      contains(err, "db:exec: not authorized")
      refused(db, "DETACH other", "projections may not use DETACH")
    end)

    it("PRAGMA, but for a few that only describe tables", function()
      local pragmas = {
        { "journal_mode", "journal_mode" }, { "journal_mode = OFF", "journal_mode" },
        { "user_version = 3", "user_version" }, { "writable_schema = ON", "writable_schema" },
        { "synchronous = OFF", "synchronous" }, { "main.cache_size", "cache_size" }, { "optimize", "optimize" },
      }
      for _, p in ipairs(pragmas) do
        refused(db, "PRAGMA " .. p[1], "projections may not use PRAGMA " .. p[2] .. ": pragmas act on the "
          .. "connection, which belongs to the runner")
      end
      assert.are.same({ "a", "b" }, (function()
        local names = {}
        for _, r in ipairs(db:rows "PRAGMA table_info(t)") do names[#names + 1] = r.name end
        return names
      end)())
      assert.are.equal(2, db:value "SELECT count(*) FROM pragma_table_info('t')")
      assert.are.equal(0, #db:rows "PRAGMA index_list(t)")
    end)

    it("transaction control: the runner owns transactions", function()
      local statements = {
        { "BEGIN", "BEGIN" }, { "BEGIN IMMEDIATE", "BEGIN" }, { "COMMIT", "COMMIT" }, { "END", "COMMIT" },
        { "ROLLBACK", "ROLLBACK" },
      }
      for _, s in ipairs(statements) do
        refused(db, s[1], "projections may not use " .. s[2] .. ": the runner owns transactions, and handlers "
          .. "already run in one")
      end
      refused(db, "SAVEPOINT s", "projections may not use SAVEPOINT")
      refused(db, "RELEASE s", "projections may not use RELEASE")
      refused(db, "ROLLBACK TO s", "projections may not use ROLLBACK TO")
      -- the owned handle's own begin/commit run on the connection directly
      db:begin()
      db:commit()
    end)

    it("VACUUM, also INTO a file", function()
      local path = os.tmpname()
      os.remove(path)
      refused(db, "VACUUM", "projections may not use VACUUM")
      refused(db, "  vacuum INTO '" .. path .. "'", "projections may not use VACUUM")
      assert.is_nil(io.open(path))
    end)

    it("functions that reach outside the database", function()
      refused(db, "SELECT load_extension('/tmp/x.so')", "projections may not call load_extension()")
      refused(db, "SELECT fts3_tokenizer('simple')", "projections may not call fts3_tokenizer()")
    end)

    describe("the runner's _ebb_ tables", function()
      local path, r

      before_each(function()
        path = os.tmpname()
        r = assert(core.projection_db(path, "write", { runner_sql = CHECKPOINT }))
        r:exec "CREATE TABLE orders (id TEXT PRIMARY KEY, total INTEGER)"
      end)

      after_each(function()
        r:close()
        os.remove(path)
      end)

      it("cannot be read or written", function()
        local why = ": names starting with _ebb_ belong to the runner"
        refused(r, "SELECT * FROM _ebb_checkpoint", "projections may not read _ebb_checkpoint" .. why)
        contains(failure(r.value, r, "SELECT position FROM _ebb_checkpoint"), "db:value: not authorized")
        refused(r, "SELECT * FROM main._EBB_CHECKPOINT", "projections may not read _ebb_checkpoint")
        refused(r, 'SELECT * FROM "_ebb_checkpoint"', "projections may not read _ebb_checkpoint")
        refused(r, "SELECT id FROM orders WHERE id IN (SELECT id FROM _ebb_checkpoint)",
          "projections may not read _ebb_checkpoint")
        refused(r, "INSERT INTO _ebb_checkpoint VALUES (2, 0)", "projections may not insert into _ebb_checkpoint")
        refused(r, "UPDATE _ebb_checkpoint SET position = ?", "projections may not update _ebb_checkpoint", 0)
        refused(r, "DELETE FROM _ebb_checkpoint", "projections may not delete from _ebb_checkpoint")
        refused(r, "INSERT INTO orders SELECT 'x', position FROM _ebb_checkpoint",
          "projections may not read _ebb_checkpoint")
      end)

      it("cannot be created, dropped, altered or indexed", function()
        refused(r, "DROP TABLE _ebb_checkpoint", "projections may not drop table _ebb_checkpoint")
        refused(r, "DROP INDEX _ebb_checkpoint_position", "projections may not drop index _ebb_checkpoint_position")
        refused(r, "CREATE TABLE _ebb_mine (x)", "projections may not create table _ebb_mine")
        refused(r, "CREATE TEMP TABLE _Ebb_mine (x)", "projections may not create table _Ebb_mine")
        refused(r, "CREATE VIEW _ebb_v AS SELECT 1", "projections may not create view _ebb_v")
        refused(r, "CREATE INDEX _ebb_i ON orders (total)", "projections may not create index _ebb_i on orders")
        refused(r, "CREATE INDEX i ON _ebb_checkpoint (id)", "projections may not create index i on _ebb_checkpoint")
        refused(r, "CREATE TRIGGER tr AFTER INSERT ON _ebb_checkpoint BEGIN SELECT 1; END",
          "projections may not create trigger tr on _ebb_checkpoint")
        refused(r, "CREATE TRIGGER _ebb_tr AFTER INSERT ON orders BEGIN SELECT 1; END",
          "projections may not create trigger _ebb_tr on orders")
        refused(r, "ALTER TABLE _ebb_checkpoint ADD COLUMN x", "projections may not alter table _ebb_checkpoint")
        refused(r, "ALTER TABLE _ebb_checkpoint RENAME TO mine", "projections may not alter table _ebb_checkpoint")
        refused(r, "ALTER TABLE orders RENAME TO _ebb_orders", "projections may not rename a table to a name "
          .. "starting with _ebb_")
        refused(r, 'ALTER TABLE main."orders" RENAME TO "_EBB_x"', "projections may not rename a table to "
          .. "a name starting with _ebb_")
        refused(r, "REINDEX _ebb_checkpoint_position", "projections may not reindex _ebb_checkpoint_position")
        refused(r, "ANALYZE _ebb_checkpoint", "projections may not analyze _ebb_checkpoint")
        refused(r, "PRAGMA table_info(_ebb_checkpoint)", "projections may not inspect _ebb_checkpoint")
        -- renaming a column, or a table to an ordinary name, is fine
        r:exec "ALTER TABLE orders RENAME COLUMN total TO amount"
        r:exec "ALTER TABLE orders RENAME TO ebb_orders"
        -- the runner's table and index are untouched
        local other = assert(core.projection_db(path, "write", { runner_sql = "CREATE TABLE copy AS "
          .. "SELECT *, (SELECT count(*) FROM sqlite_schema WHERE name LIKE '\\_ebb\\_%' ESCAPE '\\') AS n "
          .. "FROM _ebb_checkpoint" }))
        assert.are.same({ { id = 1, position = 42, n = 2 } }, other:rows "SELECT * FROM copy")
        other:close()
      end)

      it("cannot be reached through views or triggers", function()
        r:exec "CREATE VIEW peek AS SELECT * FROM _ebb_checkpoint" -- the body is checked where it is used
        refused(r, "SELECT * FROM peek", "projections may not read _ebb_checkpoint")
        r:exec "CREATE TRIGGER poke AFTER INSERT ON orders BEGIN DELETE FROM _ebb_checkpoint; END"
        refused(r, "INSERT INTO orders VALUES (?, ?)", "projections may not delete from _ebb_checkpoint", "o-1", 1)
      end)

      it("stay the runner's when the schema changes under a cached statement", function()
        r:exec "CREATE VIEW v AS SELECT id, total FROM orders"
        assert.are.same({}, r:rows "SELECT * FROM v")
        -- the runner (another connection here) points the view at its table;
        -- SQLite prepares the cached statement again inside step
        local other = assert(core.projection_db(path, "write",
          { runner_sql = "DROP VIEW v; CREATE VIEW v AS SELECT id, position AS total FROM _ebb_checkpoint" }))
        other:close()
        contains(failure(r.rows, r, "SELECT * FROM v"),
          'db:rows: not authorized: projections may not read _ebb_checkpoint: names starting with _ebb_ belong '
          .. 'to the runner (in "SELECT * FROM v")')
      end)

      it("are refused to every handle, while the connection itself is not restricted", function()
        local second = assert(core.projection_db(path))
        refused(second, "SELECT * FROM _ebb_checkpoint", "projections may not read _ebb_checkpoint")
        second:close()
        -- runner_sql runs on the connection as the runner does, next to a handle
        local runner = assert(core.projection_db(path, "write",
          { runner_sql = "INSERT INTO _ebb_checkpoint VALUES (2, 7)" }))
        refused(runner, "SELECT * FROM _ebb_checkpoint", "projections may not read _ebb_checkpoint")
        runner:close()
      end)
    end)

    describe("in read mode, everything but reading", function()
      local path, w, q

      before_each(function()
        path = os.tmpname()
        w = assert(core.projection_db(path))
        w:exec "CREATE TABLE orders (id TEXT PRIMARY KEY, total INTEGER); CREATE INDEX orders_total ON orders (total)"
        w:exec("INSERT INTO orders VALUES (?, ?)", "o-1", 10)
        q = assert(core.projection_db(path, "read"))
      end)

      after_each(function()
        q:close()
        w:close()
        os.remove(path)
      end)

      it("reads", function()
        assert.are.same({ { id = "o-1", total = 10 } }, q:rows("SELECT * FROM orders WHERE total > ?", 1))
        assert.are.equal(1, q:value "WITH x AS (SELECT * FROM orders) SELECT count(*) FROM x")
        assert.are.equal(2, #q:rows "PRAGMA table_info(orders)")
      end)

      it("refuses writes of every kind", function()
        local only = ": a query only reads"
        refused(q, "INSERT INTO orders VALUES ('o-2', 1)", "queries may not insert into orders" .. only)
        refused(q, "UPDATE orders SET total = 0", "queries may not update orders" .. only)
        refused(q, "DELETE FROM orders", "queries may not delete from orders" .. only)
        refused(q, "CREATE TABLE x (a)", "queries may not create table x" .. only)
        refused(q, "CREATE TEMP TABLE x (a)", "queries may not create table x" .. only)
        refused(q, "CREATE VIEW v AS SELECT 1", "queries may not create view v" .. only)
        refused(q, "CREATE INDEX i ON orders (id)", "queries may not create index i on orders" .. only)
        refused(q, "DROP TABLE orders", "queries may not drop table orders" .. only)
        refused(q, "DROP INDEX orders_total", "queries may not drop index orders_total on orders" .. only)
        refused(q, "ALTER TABLE orders ADD COLUMN c", "queries may not alter table orders" .. only)
        refused(q, "REINDEX orders_total", "queries may not reindex orders_total" .. only)
        refused(q, "ANALYZE", "queries may not ")
        refused(q, "WITH x AS (SELECT 1) INSERT INTO orders SELECT 'o-3', 1 FROM x",
          "queries may not insert into orders")
        contains(failure(q.rows, q, "DELETE FROM orders RETURNING *"),
          "db:rows: not authorized: queries may not delete from orders")
        assert.are.equal(1, w:value "SELECT count(*) FROM orders")
      end)

      it("keeps the write refusals of write mode too", function()
        refused(q, "ATTACH ':memory:' AS x", "projections may not use ATTACH")
        refused(q, "BEGIN", "projections may not use BEGIN")
        refused(q, "PRAGMA user_version", "projections may not use PRAGMA user_version")
      end)
    end)
  end)

  describe("virtual tables", function()
    it("FTS5 works from handlers and queries", function()
      local path = os.tmpname()
      local w = assert(core.projection_db(path))
      w:exec "CREATE VIRTUAL TABLE docs USING fts5(body)"
      w:exec("INSERT INTO docs VALUES (?)", "the quick brown fox")
      w:exec("INSERT INTO docs VALUES (?)", "a lazy dog")
      assert.are.same({ { body = "a lazy dog" } }, w:rows("SELECT body FROM docs WHERE docs MATCH ?", "lazy"))
      local q = assert(core.projection_db(path, "read"))
      assert.are.equal("the quick brown fox", q:value("SELECT body FROM docs WHERE docs MATCH ?", "fox"))
      q:close()
      w:close()
      os.remove(path)
    end)
  end)

  it("opens files as well as :memory:", function()
    local dir = support.tmpdir()
    local f = assert(core.projection_db(dir .. "/model.db"))
    f:exec "CREATE TABLE x (a)"
    f:close()
    local g = assert(core.projection_db(dir .. "/model.db", "read"))
    assert.are.equal(0, g:value "SELECT count(*) FROM x")
    g:close()
    support.rmdir(dir)
  end)
end)
