"""The router: one address for clients, many replicas behind it.

Pure routing policies (`policies/`) decide; the live proxy (`proxy.py`) is their only caller.
"""
