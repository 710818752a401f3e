"""Readers of expression stores and writers of results stores."""
