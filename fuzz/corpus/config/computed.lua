local base = "/srv/ebb"
data = base .. "/data"
aggregates = base .. "/aggregates"
max_body = 1024 * 1024 * 4
