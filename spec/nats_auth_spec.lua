-- Credentials and TLS for publishing to NATS JetStream (nats_token,
-- nats_user/nats_password, nats_creds, nats_tls_ca, nats_tls_cert/key),
-- against a real nats-server (spec/nats_support.lua) configured for each:
-- token authorization, user and password, TLS with a throwaway CA made by
-- the openssl CLI, and mutual TLS. Settings NATS refuses at run time show
-- in /health while commands go on; files that cannot be used stop the
-- start with the setting's name. Secrets never show in logs or /health.
local support = require "support"
local daemon = require "daemon_support"
local ns = require "nats_support"
local jwt = require "nats_jwt"

-- The publisher is per daemon, not per store: the specs run on SQLite only.
if support.store_kind ~= "sqlite" then return end

local q = support.quote

local sh = require("nats_support").sh

-- A self-signed CA `name` in dir (name.pem, name.key), and certificates it
-- signs: name.pem/name.key, with ext (an openssl extension line) if given.
local function make_ca(dir, name)
  sh(("cd %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes " ..
      "-days 2 -subj /CN=%s -keyout %s.key -out %s.pem"):format(q(dir), name, name, name))
end

local function make_cert(dir, ca, name, ext)
  support.write(dir .. "/" .. name .. ".cnf", ext or "basicConstraints=CA:FALSE\n")
  sh(("cd %s && openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes " ..
      "-subj /CN=%s -keyout %s.key -out %s.csr && " ..
      "openssl x509 -req -in %s.csr -CA %s.pem -CAkey %s.key -CAcreateserial -days 2 " ..
      "-extfile %s.cnf -out %s.pem"):format(q(dir), name, name, name, name, ca, ca, name, name))
end

local function nats_health(d)
  local h = ns.health(d)
  return h and h.nats
end

-- Commands go on while NATS refuses the publisher; /health says why.
local opened = 0
local function refused(d, why)
  local before = ns.health(d).position
  for _ = 1, 3 do
    opened = opened + 1
    ns.open(d, "r" .. opened)
  end
  local s = support.eventually(function()
    local st = nats_health(d)
    -- (between two attempts: "connecting" while it tries again)
    return st and st.state == "disconnected" and st.error and st.errors >= 1 and st
  end, 60, "the publisher's error")
  assert.is_false(s.connected)
  assert.are.equal(before + 3, s.lag_events)
  support.contains(s.error, why)
  return s
end

-- Nothing reached NATS: no stream was even created.
local function nothing_published(n)
  local p = assert(io.popen(n:reader_cmd { "EBB", "--info" } .. " 2>&1"))
  local text = p:read("a")
  p:close()
  support.contains(text, "10059") -- stream not found
end

describe("publishing to NATS with credentials and TLS", function()
  local n, d, data, dir

  before_each(function()
    data = support.tmpdir()
    dir = support.tmpdir()
  end)

  after_each(function()
    if d then d:stop() end
    d = nil
    if n then n:close() end
    n = nil
    support.rmdir(data)
    support.rmdir(dir)
  end)

  local function start(args, env)
    local all = { "--nats", n.url }
    for _, a in ipairs(args or {}) do all[#all + 1] = a end
    d = daemon.start { data = data, args = all, env = env }
    assert.is_not_nil(d.url, "the daemon did not start: " .. d:logs())
    return d
  end

  it("with nats_token: the right token publishes; a wrong one fails in /health, commands go on", function()
    n = ns.new { conf = 'authorization { token: "tok-7fq2-right" }\n', userinfo = "tok-7fq2-right@" }
    start({}, "EBB_NATS_TOKEN=tok-7fq2-wrong")
    local s = refused(d, "Authorization Violation")
    nothing_published(n)
    for _, text in ipairs { d:logs(), s.error } do
      assert.is_nil(text:find("tok-7fq2", 1, true), "a token shows: " .. text)
    end
    d:stop()
    start { "--nats-token", "tok-7fq2-right" }
    for i = 4, 10 do ns.open(d, i) end
    ns.caught_up(d)
    ns.assert_stream_is_store(d, n)
    assert.is_nil(d:logs():find("tok-7fq2", 1, true))
  end)

  it("with nats_user and nats_password", function()
    n = ns.new { conf = 'authorization { user: ebb, password: "pw-3kd9-right" }\n',
                 userinfo = "ebb:pw-3kd9-right@" }
    support.write(dir .. "/ebb.conf.lua", 'nats_user = "ebb"\nnats_password = "pw-3kd9-wrong"\n')
    start { "--config", dir .. "/ebb.conf.lua" }
    local s = refused(d, "Authorization Violation")
    nothing_published(n)
    assert.is_nil((d:logs() .. s.error):find("pw-3kd9", 1, true))
    d:stop()
    start({ "--nats-user", "ebb" }, "EBB_NATS_PASSWORD=pw-3kd9-right")
    ns.open(d, 4)
    ns.caught_up(d)
    ns.assert_stream_is_store(d, n)
  end)

  it("with nats_creds: a user of an account the server trusts publishes; another account's is refused", function()
    local operator, account, user = jwt.keypair("operator"), jwt.keypair("account"), jwt.keypair("user")
    local conf = jwt.server_conf(operator, { [account.public] = jwt.jwt(operator, account, "account",
                                                                          jwt.account_claims()) })
    local good = dir .. "/ebb.creds"
    support.write(good, jwt.creds(jwt.jwt(account, user, "user", jwt.user_claims()), user))
    -- the same user key, signed by an account the server does not know
    local stranger = jwt.keypair("account")
    support.write(dir .. "/other.creds", jwt.creds(jwt.jwt(stranger, user, "user", jwt.user_claims()), user))
    n = ns.new { conf = conf, reader_args = { "--creds", good } }
    start { "--nats-creds", dir .. "/other.creds" }
    local s = refused(d, "Authorization Violation")
    nothing_published(n)
    d:stop()
    start({}, "EBB_NATS_CREDS=" .. q(good))
    for i = 4, 10 do ns.open(d, i) end
    ns.caught_up(d)
    ns.assert_stream_is_store(d, n)
    for _, text in ipairs { d:logs(), s.error, (select(3, d:get("/metrics"))) } do
      assert.is_nil(text:find(user.seed, 1, true), "the seed shows")
      assert.is_nil(text:find(user.seed:sub(1, 12), 1, true), "part of the seed shows")
    end
    jwt.cleanup()
  end)

  it("over TLS with nats_tls_ca; without the CA that signed the server's certificate it refuses", function()
    make_ca(dir, "ca")
    make_ca(dir, "other")
    make_cert(dir, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    n = ns.new {
      conf = ('tls { cert_file: "%s/server.pem", key_file: "%s/server.key" }\n'):format(dir, dir),
      scheme = "tls", reader_args = { "--tls-ca", dir .. "/ca.pem" },
    }
    -- a CA that did not sign it
    start { "--nats-tls-ca", dir .. "/other.pem" }
    refused(d, "SSL handshake error")
    nothing_published(n)
    d:stop()
    -- the system's CAs only (a tls:// URL, no nats_tls_ca)
    start()
    refused(d, "SSL handshake error")
    d:stop()
    -- the right CA, and a nats:// URL: the CA file alone turns TLS on
    local url = n.url
    n.url = url:gsub("^tls:", "nats:")
    start { "--nats-tls-ca", dir .. "/ca.pem" }
    n.url = url
    for i = 4, 10 do ns.open(d, i) end
    ns.caught_up(d)
    ns.assert_stream_is_store(d, n)
  end)

  it("over mutual TLS with nats_tls_cert and nats_tls_key; without a client certificate it refuses", function()
    make_ca(dir, "ca")
    make_cert(dir, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    make_cert(dir, "ca", "client")
    n = ns.new {
      conf = ('tls { cert_file: "%s/server.pem", key_file: "%s/server.key", ca_file: "%s/ca.pem", ' ..
              'verify: true }\n'):format(dir, dir, dir),
      scheme = "tls",
      reader_args = { "--tls-ca", dir .. "/ca.pem", "--tls-cert", dir .. "/client.pem",
                      "--tls-key", dir .. "/client.key" },
    }
    start { "--nats-tls-ca", dir .. "/ca.pem" }
    local s = refused(d, "cannot connect to NATS")
    nothing_published(n)
    assert.is_truthy(s.errors >= 1)
    d:stop()
    start({ "--nats-tls-ca", dir .. "/ca.pem" },
      ("EBB_NATS_TLS_CERT=%s EBB_NATS_TLS_KEY=%s"):format(q(dir .. "/client.pem"), q(dir .. "/client.key")))
    for i = 4, 10 do ns.open(d, i) end
    ns.caught_up(d)
    ns.assert_stream_is_store(d, n)
  end)
end)

describe("the nats credentials and TLS settings", function()
  local dir

  before_each(function() dir = support.tmpdir() end)
  after_each(function() support.rmdir(dir) end)

  -- `ebb serve` with these settings (no NATS needed: they fail first).
  local function serve(args)
    local all = { "serve", "--data", dir .. "/data", "--aggregates", support.root .. "/aggregates",
                  "--listen", "127.0.0.1:0", "--nats", "nats://127.0.0.1:1" }
    for _, a in ipairs(args) do all[#all + 1] = a end
    return ns.run(all)
  end

  it("stop the start when a file cannot be used, naming the setting", function()
    support.write(dir .. "/junk.pem", "not a certificate\n")
    support.write(dir .. "/half.creds", "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJqd3QifQ.e30.x\n" ..
      "------END NATS USER JWT------\n")
    make_ca(dir, "ca")
    for _, case in ipairs {
      { { "--nats-tls-ca", dir .. "/missing.pem" },
        "nats_tls_ca: cannot read " .. dir .. "/missing.pem: No such file" },
      { { "--nats-tls-ca", dir .. "/junk.pem" },
        "nats_tls_ca: cannot load the CA certificates in " .. dir .. "/junk.pem" },
      { { "--nats-creds", dir .. "/missing.creds" }, "nats_creds: cannot read " .. dir .. "/missing.creds" },
      { { "--nats-creds", dir .. "/junk.pem" },
        "nats_creds: " .. dir .. "/junk.pem is not a NATS credentials file: it holds no user JWT" },
      { { "--nats-creds", dir .. "/half.creds" }, "is not a NATS credentials file: it holds no user NKey seed" },
      { { "--nats-tls-cert", dir .. "/ca.pem" }, "nats_tls_cert and nats_tls_key go together" },
      { { "--nats-tls-cert", dir .. "/ca.pem", "--nats-tls-key", dir .. "/junk.pem" },
        "nats_tls_cert, nats_tls_key: cannot load the client certificate" },
      { { "--nats-password", "pw" }, "nats_password needs nats_user" },
    } do
      local _, err, code = serve(case[1])
      assert.are.equal(7, code, err)
      support.contains(err, case[2])
      assert.is_nil(err:find("eyJ0eXAi", 1, true)) -- never the file's contents
    end
  end)

  it("show in ebb check with the token and the password masked", function()
    local function check(args, env)
      local all = { "check", "--data", dir .. "/data", "--aggregates", support.root .. "/aggregates" }
      for _, a in ipairs(args) do all[#all + 1] = a end
      local out, err, code = ns.run(all, env)
      assert.are.equal(0, code, err)
      return require("cjson").decode(out).config
    end
    local c = check {}
    for _, name in ipairs { "nats_creds", "nats_token", "nats_user", "nats_password", "nats_tls_ca",
                            "nats_tls_cert", "nats_tls_key" } do
      assert.are.same({ value = "", source = "default" }, c[name])
    end
    c = check({ "--nats-token", "tok-secret-1" }, "EBB_NATS_USER=ebb EBB_NATS_PASSWORD=pw-secret-2")
    assert.are.same({ value = "(set)", source = "flag" }, c.nats_token)
    assert.are.same({ value = "ebb", source = "env" }, c.nats_user)
    assert.are.same({ value = "(set)", source = "env" }, c.nats_password)
    support.write(dir .. "/c.lua", ("nats_tls_ca = %q\n"):format(dir .. "/ca.pem"))
    c = check { "--config", dir .. "/c.lua" }
    assert.are.same({ value = dir .. "/ca.pem", source = "file" }, c.nats_tls_ca)
  end)
end)
