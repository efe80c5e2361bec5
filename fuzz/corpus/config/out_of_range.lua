max_connections = 0
