local i = 0
::top:: i = i + 1
if i < 10 then goto top end
heartbeat_ms = i * 100
