return {
  data = "data", aggregates = "aggregates", projections = "projections",
  durability = "full", listen = "[::1]:0", token = "s3cret", url = "",
  log_level = "info", log_format = "auto",
  max_body = 1048576, max_connections = 1024, idle_timeout_ms = 60000,
  request_timeout_ms = 10000, shutdown_timeout_ms = 10000, cache_size = 10000,
  subscriber_buffer = 4194304, heartbeat_ms = 15000, memory_limit = 0,
  instruction_budget = 0, query_timeout_ms = 5000,
}
