local function f(x) return x * 2 end
idle_timeout_ms = f(500)
