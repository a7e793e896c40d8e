"""The web UI over the task log (`orchestrator ui`).

- `app`: the Starlette routes, rendering, live updates and the action endpoints;
- `pages`: each page as a list of panels, one load function and one template each;
- `reads`: the queries only pages need (the rest comes from `orchestrator.queries`);
- `layout`: the geometry of the DAG and of the timeline, drawn as inline SVG;
- `actions`: start, retry and cancel, through the same runtime calls as the CLI;
- `security`: cross-site checks, form tokens and response headers;
- `server`: wiring to the database and the runtime, and uvicorn.

Templates and static files ship inside the package (`templates/`, `static/`).
"""
