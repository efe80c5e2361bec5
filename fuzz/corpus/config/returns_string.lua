return "data"
