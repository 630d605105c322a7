"""The relay's web pages: Markdown sources and one layout built into static files."""
