"""Test doubles: stand-ins for libraries and hardware the CI machine lacks."""
