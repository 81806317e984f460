"""The review web page (`scanmilter web`) and what it shares with the digests (`quarantine notify`).

  links.py     the secret key, signed links (entry, recipient, expiry) and form tokens: standard library only
  text.py      hostile message content made into safe text (headers decoded, HTML parts stripped of tags)
  actions.py   what a recipient or a postmaster does to an entry: the quarantine command's own code
  auth.py      postmasters' password hashes, sessions and login rate limits
  app.py       the Flask application (imported only by `scanmilter web`: Flask is the `web` extra)
  command.py   `scanmilter web` and `scanmilter web passwd`
"""
