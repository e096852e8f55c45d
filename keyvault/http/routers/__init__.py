"""The HTTP API by area; each module holds one ``router`` that app.py includes."""
