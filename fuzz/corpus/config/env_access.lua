_ENV.data = "d"
