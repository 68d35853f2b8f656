"""Theory and simulation on recordings, figures and tables. Imports modiff; modiff never imports this."""
