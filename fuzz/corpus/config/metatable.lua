setmetatable(_ENV, {__newindex = function() end})
