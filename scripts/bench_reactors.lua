-- Reactor catch-up speed (scripts/bench reactors): N confirmed orders, each
-- against its own bank account, are stored before the reactor exists (seeded
-- at durability normal with no reactors); then a daemon starts with
-- reactors/order_payment.lua on a copy of that data, and the time until it
-- has charged every account (its checkpoint at the head, nothing in flight,
-- N commands issued) gives its rate. Beside it, in the same run and on the
-- same data: the plain command rate, N Withdraw commands sent over HTTP by 64
-- keep-alive clients (what the daemon's group commit can do with as many
-- commands in flight), and one client at a time. Then, if strace is there,
-- the reactor's run again under `strace -f -c` for the number of fsync and
-- fdatasync calls per command: the figure the load of the machine does not
-- distort. Figures, never assertions.
-- Usage: lua5.4 scripts/bench_reactors.lua [N] [durability ...]
--        EBB (the binary, default build/ebb) may name another build (A/B).
package.path = "spec/?.lua;" .. package.path
local support = require "support"
if os.getenv("EBB") then support.ebb = os.getenv("EBB") end
local daemon = require "daemon_support"
local socket = require "socket"

local n = tonumber(arg[1] or "300")
local levels = {}
for i = 2, #arg do levels[#levels + 1] = arg[i] end
if #levels == 0 then levels = { "normal", "full" } end

local function cpu_seconds(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return 0 end
  local s = f:read("a")
  f:close()
  local rest = s:match("%) (.*)")
  local fields = {}
  for x in rest:gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100 -- utime + stime, clock ticks
end

local function loadavg()
  local f = io.open("/proc/loadavg")
  local s = f:read("l")
  f:close()
  return s:match("^(%S+ %S+ %S+)")
end

local function have(program) return os.execute("command -v " .. program .. " >/dev/null 2>&1") end

-- Polls the reactor until it has charged every account.
local function caught_up(d)
  repeat
    socket.sleep(0.02)
    local st, body = d:get("/reactors/order_payment")
    local s = st == 200 and body or nil
  until s and s.state == "live" and s.in_flight == 0 and s.position == s.head and s.commands_issued >= n
end

local function check(st, what, answer)
  if st ~= 200 then error(what .. ": " .. tostring(st) .. " " .. require("cjson").encode(answer or {})) end
end

-- Sends the requests of make(i), i = 1..count, over `clients` keep-alive connections.
local function load(d, count, clients, make)
  local next_i = 0
  daemon.load(d, clients, function()
    next_i = next_i + 1
    return next_i <= count and make(next_i) or nil
  end, function(_, st, answer) check(st, "load", answer) end)
end

-- The seed: n accounts and n confirmed orders, no reactor.
local empty = support.tmpdir()
local seed = daemon.start({ args = { "--reactors", empty }, durability = "normal" })
load(seed, n, 64, function(i)
  return { aggregate = "bank_account", id = "a" .. i, type = "OpenAccount",
           data = { owner = "B", initial_deposit = 1000000 } }
end)
load(seed, n, 64, function(i)
  return { aggregate = "order", id = "o" .. i, type = "CreateOrder",
           data = { customer_id = "c", account_id = "a" .. i } }
end)
load(seed, n, 64, function(i)
  return { aggregate = "order", id = "o" .. i, type = "AddItem", data = { sku = "A", qty = 1, price = 10 } }
end)
load(seed, n, 64, function(i) return { aggregate = "order", id = "o" .. i, type = "ConfirmOrder", data = {} } end)
seed:stop()

local function copy()
  local data = support.tmpdir()
  assert(os.execute("cp -a '" .. seed.data .. "'/. '" .. data .. "'/"))
  return data
end

print(("reactor catch-up: %d confirmed orders (%d Order events) stored before the reactor exists; binary %s")
  :format(n, 3 * n, support.ebb))
for _, level in ipairs(levels) do
  -- The reactor.
  local data = copy()
  local load0 = loadavg()
  local t0 = socket.gettime()
  local d = daemon.start({ data = data, durability = level,
                           args = { "--reactors", support.root .. "/reactors" } })
  caught_up(d)
  local dt = socket.gettime() - t0
  local cpu = cpu_seconds(d.pid)
  d:stop()
  support.rmdir(data)
  local rate = n / dt
  -- The plain command rate, on the same data: n Withdraw commands.
  local function plain(clients)
    local data2 = copy()
    local d2 = daemon.start({ data = data2, durability = level, args = { "--reactors", empty } })
    local c0, t1 = cpu_seconds(d2.pid), socket.gettime()
    load(d2, n, clients, function(i)
      return { aggregate = "bank_account", id = "a" .. i, type = "Withdraw", data = { amount = 10 } }
    end)
    local r = n / (socket.gettime() - t1)
    local c = cpu_seconds(d2.pid) - c0
    d2:stop()
    support.rmdir(data2)
    return r, c
  end
  local p64, c64 = plain(64)
  local p1 = plain(1)
  print(("durability %-6s reactor: %d commands in %.2f s = %.0f commands/s "
         .. "(daemon CPU %.2f s incl. start, %.0f us/command)"):format(level, n, dt, rate, cpu, cpu / n * 1e6))
  print(("                plain commands, 64 clients: %.0f/s (daemon CPU %.0f us/command); 1 client: %.0f/s")
    :format(p64, c64 / n * 1e6, p1))
  print(("                reactor / plain(64) = %.2f, reactor / plain(1) = %.2f; load average %s -> %s")
    :format(rate / p64, rate / p1, load0, loadavg()))
  if have("strace") and have("pgrep") then
    -- The same catch-up under strace: the daemon's fsync/fdatasync calls.
    local dir = support.tmpdir()
    local wrapper, out = dir .. "/ebb", dir .. "/syncs"
    support.write(wrapper, ("#!/bin/sh\nexec strace -f -c -o '%s' -e trace=fsync,fdatasync '%s' \"$@\"\n")
      :format(out, support.ebb))
    os.execute("chmod +x '" .. wrapper .. "'")
    local data3 = copy()
    local real = support.ebb
    support.ebb = wrapper
    local d3 = daemon.start({ data = data3, durability = level,
                              args = { "--reactors", support.root .. "/reactors" } })
    support.ebb = real
    caught_up(d3)
    -- SIGTERM to ebb itself (strace's child): strace writes its counts when it ends.
    local p = io.popen("pgrep -P " .. d3.pid)
    local child = p:read("l")
    p:close()
    os.execute("kill -TERM " .. child)
    d3:wait(20)
    local syncs = 0
    for line in io.lines(out) do
      local f = {} -- % time, seconds, usecs/call, calls, [errors,] syscall
      for x in line:gmatch("%S+") do f[#f + 1] = x end
      if (f[#f] == "fsync" or f[#f] == "fdatasync") and tonumber(f[4]) then syncs = syncs + tonumber(f[4]) end
    end
    print(("                syncs (fsync + fdatasync) while catching up, under strace: %d = %.3f per command")
      :format(syncs, syncs / n))
    d3:stop()
    support.rmdir(data3)
    support.rmdir(dir)
  end
end
support.rmdir(seed.data)
support.rmdir(empty)
