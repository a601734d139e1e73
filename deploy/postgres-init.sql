-- Run once by the postgres image when its data volume is new (deploy/compose.yaml).
-- The application role logs in with no special privileges; the migrations grant what it needs.
CREATE ROLE runstate_app LOGIN PASSWORD 'runstate';
