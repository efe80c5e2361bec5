data = "data"
aggregates = "aggregates"
listen = "127.0.0.1:7070"
max_body = 2097152
