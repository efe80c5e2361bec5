data = 
