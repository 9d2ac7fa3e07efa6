"""The API's routes, one module per resource; :func:`serve.api.app.create_app` adds each module's ``routes``."""
