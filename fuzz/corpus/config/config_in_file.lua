config = "other.lua"
