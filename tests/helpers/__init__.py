"""Helpers shared by the test suite: database selection, private namespaces, fault tools."""
