# syntax=docker/dockerfile:1
# garage-init: Garage's CLI with a shell (Garage's own image holds only its binary), to set up
# the single node of deploy/compose/compose.yaml. Runs once, as root: it reads the node's key
# from Garage's meta volume, which Garage (root in its image) writes with mode 0600.
# The same Garage as compose.yaml's (see the note on its tag there).
FROM dxflrs/garage:v2.4.1 AS garage

FROM busybox:1.37
COPY --from=garage /garage /usr/local/bin/garage
COPY garage-init.sh /usr/local/bin/garage-init
ENTRYPOINT ["/usr/local/bin/garage-init"]
