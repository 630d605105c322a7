"""chatmail_api: the relay's control API (status, DNS, account creation, metrics, probe).

``chatmail_api.app.create_app(settings)`` builds the FastAPI app; ``chatmail-api
--settings /etc/chatmail/api.json`` serves it (``chatmail_api.main``).
"""
