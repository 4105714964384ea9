"""Results going out: signed callbacks and the results stream."""
