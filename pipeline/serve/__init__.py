"""``captioner serve``: a web page for searching an index, on Starlette + uvicorn.

  service.IndexService     what the page asks of an ImageIndex (search, filters, one row)
  thumbs.ThumbnailCache    thumbnails from the originals, cached on disk with a size bound
  app.create_app           the Starlette app: the page, static files, the JSON API
  command.serve            the click command

The page (static/) is plain HTML, CSS and JavaScript shipped in the package:
no build step and nothing loaded from elsewhere.
"""
