data = nothing.here
