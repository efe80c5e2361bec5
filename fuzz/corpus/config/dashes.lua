return { ["max-body"] = 4096 }
