data = ("x"):rep(3)
