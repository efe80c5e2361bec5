return { data = "/var/lib/ebb", durability = "normal", log_level = "debug", log_format = "json" }
