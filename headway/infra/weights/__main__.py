"""`python -m headway.infra.weights URL`: fetch a remote model source onto this node."""
from headway.infra.weights.fetch import main

raise SystemExit(main())
