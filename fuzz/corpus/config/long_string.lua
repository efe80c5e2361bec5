token = [[multi
line]]
