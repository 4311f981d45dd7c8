"""lockless-hub: a real-time job hub for speech translation fleets."""

__version__ = "0.1.0"
