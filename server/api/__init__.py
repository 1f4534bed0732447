"""The HTTP edge: routes, wire schemas, response bodies, auth and the error envelope.

The only package that knows about HTTP; the pipeline below it raises domain failures
(`server.failures`), which `errors` turns into statuses.
"""
