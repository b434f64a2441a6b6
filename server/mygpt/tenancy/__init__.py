"""Tenants: who an API key belongs to, what it may use, its limits and its usage."""
