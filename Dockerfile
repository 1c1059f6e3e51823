# Image for every service of compose.yaml (the Docker variant of `ntm lab up`).
FROM python:3.11-slim-bookworm

# The same tools the netns lab uses on the host.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 nftables procps nsd unbound curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e /app

# compose mounts the repo over /app (so edits need no rebuild) and the state volume here.
ENV NTM_LAB_STATE=/state PYTHONUNBUFFERED=1
VOLUME /state

# Apply the service's NTM_LAB_ROUTES / NTM_LAB_RULES / NTM_LAB_MASQUERADE, then exec the command.
ENTRYPOINT ["ntm", "lab", "service-init", "--"]
CMD ["sleep", "infinity"]
