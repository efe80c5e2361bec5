std = "lua54"
max_line_length = 120
files["spec/**/*.lua"] = { std = "+busted" }
exclude_files = { "build*/**" }
-- The HTTP API spec keeps whole requests and expected answers on one line,
-- and reads some results only in the cases that check them.
files["spec/daemon_api_spec.lua"] = { std = "+busted", max_line_length = 160, ignore = { "311" } }
