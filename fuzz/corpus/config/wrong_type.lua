max_body = "big"
