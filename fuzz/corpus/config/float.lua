max_body = 1.5
