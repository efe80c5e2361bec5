listen = "nowhere"
