-- /etc/ebb/ebb.conf.lua: the settings of ebb.service (`ebb serve --config`).
-- A Lua chunk that assigns settings; unknown names are errors. Every setting
-- also comes from EBB_<NAME> in the environment or a --flag, which win over
-- this file. `ebb --help` lists them all, `ebb check --config FILE` checks them.

-- The data directory: the SQLite event store and the projections' read models.
-- systemd creates it for the ebb user (StateDirectory=ebb).
data = "/var/lib/ebb"

-- Your domain: aggregate, projection and reactor modules (readable by the ebb
-- user). Copy them here from your project (ebb init), then `systemctl reload ebb`.
aggregates = "/etc/ebb/aggregates"
projections = "/etc/ebb/projections"
reactors = "/etc/ebb/reactors"

-- HOST:PORT to listen on. Off loopback a token is required; put a TLS
-- terminating proxy (nginx) in front of it for remote clients.
listen = "127.0.0.1:7070"
-- token = "a long random string"   -- clients send Authorization: Bearer <token>

-- full: fsync every commit (an acknowledged event survives a power cut);
-- normal: faster, a power cut may lose the last acknowledged commits.
durability = "full"

-- The journal adds its own timestamps; json suits log shippers.
log_format = "text"
log_level = "info"

-- store = "postgresql://ebb@localhost/ebb"   -- PostgreSQL instead of SQLite
-- shutdown_timeout_ms = 10000                -- SIGTERM waits this long for in-flight work
-- cache_size = 10000                         -- aggregates kept in memory
-- max_body = 1048576                         -- largest request body in bytes
