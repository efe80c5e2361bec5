-- `ebb ... --url https://...`: the CLI through a TLS-terminating reverse
-- proxy. The daemon speaks plain HTTP only; here nginx (Debian's) stands in
-- front of it on loopback, with a throwaway CA and a certificate it signed
-- made by the openssl CLI, in the configuration the README shows (SSE
-- buffering off). nginx runs from a temporary prefix with its own config,
-- pid file and logs: it reads no system file and writes none.
local support = require "support"
local daemon = require "daemon_support"
local json = require "cjson"
local socket = require "socket"

local q = support.quote

local function sh(cmd)
  local ok = os.execute(cmd .. " > /dev/null 2>&1")
  assert(ok, "failed: " .. cmd)
end

local function free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- A self-signed CA named `name` in dir: name.pem, name.key.
local function make_ca(dir, name)
  sh(("cd %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes " ..
      "-days 2 -subj /CN=%s -keyout %s.key -out %s.pem"):format(q(dir), name, name, name))
end

-- server.pem/server.key for 127.0.0.1 and localhost, signed by the CA `ca`.
local function make_server_cert(dir, ca)
  support.write(dir .. "/ext.cnf", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
  sh(("cd %s && openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes " ..
      "-subj /CN=localhost -keyout server.key -out server.csr && " ..
      "openssl x509 -req -in server.csr -CA %s.pem -CAkey %s.key -CAcreateserial -days 2 " ..
      "-extfile ext.cnf -out server.pem"):format(q(dir), ca, ca))
end

-- The README's configuration, with this run's paths and ports.
local function nginx_conf(dir, port, h2port, upstream)
  return ([[
worker_processes 1;
pid %s/nginx.pid;
error_log %s/error.log info;
events { worker_connections 64; }
http {
  access_log %s/access.log;
  client_body_temp_path %s/client_body;
  proxy_temp_path %s/proxy;
  fastcgi_temp_path %s/fastcgi;
  uwsgi_temp_path %s/uwsgi;
  scgi_temp_path %s/scgi;

  upstream ebb {
    server %s;
    keepalive 8;
  }
  server {
    listen 127.0.0.1:%d ssl;
    listen 127.0.0.1:%d ssl http2;
    server_name localhost;
    ssl_certificate %s/server.pem;
    ssl_certificate_key %s/server.key;

    location / {
      proxy_pass http://ebb;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }
    location = /subscribe {
      proxy_pass http://ebb;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_buffering off;
      proxy_cache off;
      proxy_read_timeout 1h;
    }
  }
}
]]):format(dir, dir, dir, dir, dir, dir, dir, dir, upstream, port, h2port, dir, dir)
end

-- Starts nginx in front of the daemon at `upstream` (host:port). A port
-- taken between choosing it and nginx binding it means another try.
local function start_nginx(dir, upstream)
  for _ = 1, 5 do
    local port, h2port = free_port(), free_port()
    support.write(dir .. "/nginx.conf", nginx_conf(dir, port, h2port, upstream))
    os.remove(dir .. "/error.log")
    local p = assert(io.popen(("nginx -p %s -c %s -e %s -g 'daemon off;' > %s 2>&1 & echo $!")
      :format(q(dir), q(dir .. "/nginx.conf"), q(dir .. "/error.log"), q(dir .. "/nginx.out"))))
    local pid = tonumber(p:read("l"))
    p:close()
    local state = support.eventually(function()
      local c = socket.connect("127.0.0.1", port)
      if c then
        c:close()
        return "up"
      end
      if not daemon.alive({ pid = pid }) then return "dead" end
    end, 60, "nginx to listen")
    if state == "up" then return { pid = pid, port = port, h2port = h2port } end
    local log = support.read(dir .. "/error.log") .. support.read(dir .. "/nginx.out")
    assert(log:find("Address already in use", 1, true), "nginx did not start: " .. log)
  end
  error("nginx found no free port in 5 tries")
end

-- Runs `ebb args...` in the background; its exit code goes to a file.
local function spawn(args, env)
  local parts = { q(support.ebb) }
  for _, a in ipairs(args) do parts[#parts + 1] = q(a) end
  local h = { out = os.tmpname(), err = os.tmpname(), code = os.tmpname() }
  os.remove(h.code)
  local script = ("%s %s > %s 2> %s; echo $? > %s"):format(env or "", table.concat(parts, " "),
    q(h.out), q(h.err), q(h.code))
  local p = assert(io.popen("bash -c " .. q(script) .. " > /dev/null 2>&1 & echo $!"))
  h.pid = tonumber(p:read("l"))
  p:close()
  return h
end

-- Waits for a spawned ebb to exit: stdout, stderr, exit code.
local function finish(h)
  support.eventually(function()
    local f = io.open(h.code)
    if not f then return false end
    local text = f:read("a")
    f:close()
    return text:match("%d+")
  end, 60, "the CLI to exit")
  local out, err = support.read(h.out), support.read(h.err)
  local code = tonumber(support.read(h.code):match("%d+"))
  os.remove(h.out)
  os.remove(h.err)
  os.remove(h.code)
  return out, err, code
end

local function subscribers(d)
  local _, _, text = d:get("/metrics")
  return tonumber(tostring(text):match("\nebb_subscribers (%d+)"))
end

describe("ebb --url https:// through nginx terminating TLS", function()
  local d, dir, proxy, url, cacert

  setup(function()
    d = daemon.start()
    assert(d.url, "the daemon did not start: " .. daemon.logs(d))
    dir = support.tmpdir()
    make_ca(dir, "ca")
    make_ca(dir, "other")
    make_server_cert(dir, "ca")
    cacert = dir .. "/ca.pem"
    proxy = start_nginx(dir, d.host .. ":" .. d.port)
    url = "https://127.0.0.1:" .. proxy.port
  end)

  teardown(function()
    if proxy then
      os.execute("kill " .. proxy.pid .. " 2>/dev/null")
      daemon.wait(proxy, 30)
    end
    if d then d:stop() end
    support.rmdir(dir)
  end)

  it("1. sends a command and reads it back with --cacert", function()
    local out, err, code = support.run { "send", "Order", "tls-1", "CreateOrder",
                                         '{"customer_id":"c"}', "--url", url, "--cacert", cacert }
    assert.equal(0, code, err)
    local ack = json.decode(out)
    assert.equal("Order-tls-1", ack.stream)
    out, err, code = support.run { "read", "Order-tls-1", "--url", url, "--cacert", cacert }
    assert.equal(0, code, err)
    local events = support.lines(out, json.decode)
    assert.equal(1, #events)
    assert.equal("OrderCreated", events[1].type)
    assert.equal("c", events[1].data.customer_id)
    -- the same answer as straight from the daemon
    local plain = support.run { "read", "Order-tls-1", "--url", d.url }
    assert.equal(plain, out)
    -- and the state, through the proxy too
    out, err, code = support.run { "state", "Order", "tls-1", "--url", url, "--cacert", cacert }
    assert.equal(0, code, err)
    assert.equal("c", json.decode(out).state.customer_id)
  end)

  it("2. takes the CA file from EBB_CACERT too", function()
    local h = spawn({ "read", "Order-tls-1", "--url", url }, "EBB_CACERT=" .. q(cacert))
    local out, err, code = finish(h)
    assert.equal(0, code, err)
    assert.equal(1, #support.lines(out, json.decode))
  end)

  it("3. the daemon's errors come through the proxy as locally: exit code and message", function()
    local out, err, code = support.run { "read", "Order-none", "--from", "1", "--url", url,
                                         "--cacert", cacert }
    assert.equal("", out)
    assert.equal(3, code, err)
    assert.matches("^ebb: not_found: stream Order%-none does not exist\n", err)
  end)

  it("4. `ebb events --follow` receives a live event through the proxy", function()
    local _, _, head = d:get("/events?after=0&limit=1000")
    local after = math.tointeger(assert(json.decode(head).next))
    local h = spawn { "events", "--follow", "--after", tostring(after), "--limit", "1",
                      "--url", url, "--cacert", cacert }
    support.eventually(function()
      local f = io.open(h.code)
      if f then
        f:close()
        error("the follower ended early: " .. support.read(h.err))
      end
      return subscribers(d) == 1
    end, 60, "the subscription")
    assert.equal(200, (d:command("Order", "tls-live", "CreateOrder", { customer_id = "live" })))
    local out, err, code = finish(h)
    assert.equal(0, code, err)
    local events = support.lines(out, json.decode)
    assert.equal(1, #events)
    assert.equal("Order-tls-live", events[1].stream)
    assert.equal("live", events[1].data.customer_id)
  end)

  it("5. without --cacert the proxy's certificate is refused: a TLS error, exit 1", function()
    local out, err, code = support.run { "read", "Order-tls-1", "--url", url }
    assert.equal("", out)
    assert.equal(1, code)
    assert.matches("^ebb: unavailable: TLS failure with " .. url:gsub("%p", "%%%0") .. ": ", err)
    assert.matches("certificate", err)
    support.contains(err, "--cacert")
    -- nor does a follow get anywhere
    out, err, code = support.run { "events", "--follow", "--url", url }
    assert.equal("", out)
    assert.equal(1, code)
    assert.matches("^ebb: unavailable: TLS failure with ", err)
  end)

  it("6. a CA that did not sign the certificate is refused too", function()
    local out, err, code = support.run { "send", "Order", "tls-2", "CreateOrder",
                                         '{"customer_id":"c"}', "--url", url,
                                         "--cacert", dir .. "/other.pem" }
    assert.equal("", out)
    assert.equal(1, code)
    assert.matches("^ebb: unavailable: TLS failure with ", err)
    -- and nothing was written
    local status = d:get("/streams/Order-tls-2")
    assert.equal(404, status)
  end)

  it("7. a CA file that cannot be read is a clear error, exit 7", function()
    local out, err, code = support.run { "read", "Order-tls-1", "--url", url,
                                         "--cacert", dir .. "/missing.pem" }
    assert.equal("", out)
    assert.equal(7, code, err)
    assert.matches("^ebb: bad_request: cannot use the CA certificates for ", err)
  end)

  it("8. HTTP/2 to the proxy (curl negotiates it): a read and a live follow", function()
    local h2 = "https://127.0.0.1:" .. proxy.h2port
    local out, err, code = support.run { "read", "Order-tls-1", "--url", h2, "--cacert", cacert }
    assert.equal(0, code, err)
    assert.equal(support.run { "read", "Order-tls-1", "--url", d.url }, out)
    local _, _, head = d:get("/events?after=0&limit=1000")
    local after = math.tointeger(assert(json.decode(head).next))
    local h = spawn { "events", "--follow", "--after", tostring(after), "--limit", "1",
                      "--url", h2, "--cacert", cacert }
    support.eventually(function() return subscribers(d) == 1 end, 60, "the subscription")
    assert.equal(200, (d:command("Order", "tls-h2", "CreateOrder", { customer_id = "h2" })))
    out, err, code = finish(h)
    assert.equal(0, code, err)
    assert.equal("Order-tls-h2", json.decode(out).stream)
    -- it was HTTP/2 between the CLI and nginx (logged once nginx sees the stream closed)
    support.eventually(function()
      return support.read(dir .. "/access.log"):find('"GET /subscribe?after=' .. after .. ' HTTP/2.0"', 1, true)
    end, 60, "nginx to log the HTTP/2 subscription")
  end)

  it("9. a plain http:// URL to the TLS port fails plainly", function()
    local out, err, code = support.run { "read", "Order-tls-1", "--url",
                                         "http://127.0.0.1:" .. proxy.port }
    assert.equal("", out)
    assert.are_not.equal(0, code)
    assert.matches("^ebb: ", err)
  end)
end)

describe("ebb events --follow --url: how a stream ends", function()
  it("1. exits 1 with the daemon's reason when the daemon ends the subscription", function()
    local d = daemon.start()
    finally(function() d:stop() end)
    assert(d.url, "the daemon did not start: " .. daemon.logs(d))
    assert.equal(200, (d:command("Order", "f-1", "CreateOrder", { customer_id = "c" })))
    local h = spawn { "events", "--follow", "--url", d.url }
    support.eventually(function() return subscribers(d) == 1 end, 60, "the subscription")
    d:signal("TERM")
    local out, err, code = finish(h)
    assert.equal(1, code, err)
    assert.equal("Order-f-1", json.decode(out).stream)
    assert.matches("^ebb: subscription ended %(shutdown%): ", err)
  end)
end)

describe("ebb events --follow --url against a stand-in server", function()
  -- Answers one request with the given raw response bytes, then closes.
  local function serve(response)
    local script = os.tmpname()
    local portfile = os.tmpname()
    support.write(script, ([[
      local socket = require "socket"
      local s = assert(socket.bind("127.0.0.1", 0))
      local _, port = s:getsockname()
      local f = io.open(%q, "w") f:write(port) f:close()
      s:settimeout(60)
      local c = s:accept()
      if c then
        c:settimeout(10)
        repeat local l = c:receive("*l") until not l or l == ""
        c:send(%q)
        c:close()
      end
    ]]):format(portfile, response))
    os.remove(portfile)
    local p = assert(io.popen("lua5.4 " .. q(script) .. " > /dev/null 2>&1 & echo $!"))
    local pid = p:read("l")
    p:close()
    local port = support.eventually(function()
      local f = io.open(portfile)
      if not f then return nil end
      local text = f:read("a")
      f:close()
      return text:match("%d+")
    end, 60, "the stand-in server")
    return "http://127.0.0.1:" .. port, function()
      os.execute("kill " .. pid .. " 2>/dev/null")
      os.remove(script)
      os.remove(portfile)
    end
  end

  local head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"

  it("1. reads events whatever their line endings, skips comments, drops an unfinished last one",
    function()
      local url, stop = serve(head .. "\r\n" ..
        ":heartbeat\r\nid: 1\r\ndata: {\"a\":1}\r\n\r\n" ..
        "id: 2\rdata: {\"a\":\r" .. "data: 2}\r\r" ..
        "event: message\ndata: {\"a\":3}\n\n" ..
        "data: {\"a\":4}\n")
      finally(stop)
      local out, err, code = support.run { "events", "--follow", "--url", url }
      assert.equal(0, code, err)
      assert.equal('{"a":1}\n{"a":\n2}\n{"a":3}\n', out)
    end)

  it("2. a 200 answer that is not an event stream: exit 7", function()
    local url, stop = serve("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" ..
                            "Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    finally(stop)
    local out, err, code = support.run { "events", "--follow", "--url", url }
    assert.equal("", out)
    assert.equal(7, code, err)
    assert.matches("answered with application/json, not an event stream", err)
  end)

  it("3. a chunked stream cut mid-way: exit 1, after the events that did arrive", function()
    local chunk = 'data: {"a":1}\n\n'
    local url, stop = serve(head .. "Transfer-Encoding: chunked\r\n\r\n" ..
                            ("%x\r\n%s\r\n"):format(#chunk, chunk) .. "40\r\ndata: {\"a\"")
    finally(stop)
    local out, err, code = support.run { "events", "--follow", "--url", url }
    assert.equal('{"a":1}\n', out)
    assert.equal(1, code, err)
    assert.matches("^ebb: unavailable: http://127%.0%.0%.1:%d+ closed the event stream mid%-way", err)
  end)

  it("4. an error answer is printed as the daemon's error", function()
    local body = '{"error":{"code":"bad_request","message":"after must be \\"a number\\""}}'
    local url, stop = serve("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n" ..
                            "Content-Length: " .. #body .. "\r\nConnection: close\r\n\r\n" .. body)
    finally(stop)
    local out, err, code = support.run { "events", "--follow", "--url", url }
    assert.equal("", out)
    assert.equal(7, code, err)
    assert.matches('^ebb: bad_request: after must be "a number"\n', err)
  end)
end)
