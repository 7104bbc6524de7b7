"""ε backends: runners with one interface, ``eps(x, t) -> eps``, usable as context managers."""
