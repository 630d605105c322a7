{#- ACME (http-01): nginx serves chatmail.paths.acme_webroot on port 80; the client's hook
    copies each issued certificate over the stand-in (tls-install-cert). Needs public DNS
    and reachability from the CA: not exercised by the test suite. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/files/limits.jinja" import unit_limits with context %}
{%- set tls = chatmail.tls %}
{%- set d = chatmail.mail_domain %}
{%- set names = [d, "mta-sts." ~ d, "www." ~ d] %}
{%- set email = chatmail.settings.acme_email %}

include:
  - chatmail.packages
  - chatmail.web

chatmail-tls-install-script:
  file.managed:
    - name: {{ tls.install_script }}
    - source: salt://chatmail/tls/files/tls-install-cert.jinja
    - template: jinja
    - mode: "0755"
    - makedirs: True

chatmail-tls-acme-webroot:
  file.directory:
    - name: {{ chatmail.paths.acme_webroot }}/.well-known/acme-challenge
    - makedirs: True
    - mode: "0755"

{%- if tls.acme_client == "acmetool" %}

chatmail-tls-acmetool-target:
  file.managed:
    - name: /var/lib/acme/conf/target
    - makedirs: True
    - contents: |
        request:
          provider: https://acme-v02.api.letsencrypt.org/directory
          key:
            type: ecdsa
            ecdsa-curve: nistp256
          challenge:
            webroot-paths:
              - {{ chatmail.paths.acme_webroot }}/.well-known/acme-challenge

chatmail-tls-acmetool-responses:
  file.managed:
    - name: /var/lib/acme/conf/responses
    - makedirs: True
    - contents: |
        "acme-enter-email": {{ email | json }}
        "acme-agreement:https://letsencrypt.org/documents/LE-SA-v1.8-July-06-2026.pdf": true

chatmail-tls-acmetool-desired:
  file.managed:
    - name: /var/lib/acme/desired/{{ d }}
    - makedirs: True
    - contents: |
        satisfy:
          names: {{ names | json }}

chatmail-tls-acmetool-hook:
  file.managed:
    - name: /etc/acme/hooks/chatmail
    - source: salt://chatmail/tls/files/acmetool-hook.jinja
    - template: jinja
    - mode: "0755"
    - makedirs: True

chatmail-tls-acme-issue:
  cmd.run:
    - name: acmetool --batch reconcile
    - unless: test -e /var/lib/acme/live/{{ d }}/fullchain
    - require:
      - file: chatmail-tls-acmetool-target
      - file: chatmail-tls-acmetool-responses
      - file: chatmail-tls-acmetool-desired
      - file: chatmail-tls-acmetool-hook
      - file: chatmail-tls-acme-webroot
      - service: chatmail-web-service

{#- The hook may have failed on an earlier run: install whatever acmetool holds. #}
chatmail-tls-acme-install:
  cmd.run:
    - name: {{ tls.install_script }} /var/lib/acme/live/{{ d }}/fullchain /var/lib/acme/live/{{ d }}/privkey
    - onlyif: test -e /var/lib/acme/live/{{ d }}/fullchain
    - unless: cmp -s /var/lib/acme/live/{{ d }}/fullchain {{ tls.cert }}
    - require:
      - cmd: chatmail-tls-acme-issue
      - file: chatmail-tls-install-script

chatmail-tls-acme-renew-service:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/chatmail-acme-renew.service
    - contents: |
        # Managed by Salt (chatmail formula).
        [Unit]
        Description=Renew the relay's ACME certificate (acmetool)
        [Service]
        Type=oneshot
        ExecStart=/usr/bin/acmetool --batch reconcile
        {{ unit_limits("chatmail-acme-renew") | indent(8) }}

{%- else %}

chatmail-tls-acme-issue:
  cmd.run:
    - name: >-
        certbot certonly --non-interactive --agree-tos --webroot
        -w {{ chatmail.paths.acme_webroot }} --cert-name {{ d }}
        {%- for name in names %} -d {{ name }}{% endfor %}
        {{ ("-m " ~ email) if email else "--register-unsafely-without-email" }}
        --deploy-hook '{{ tls.install_script }} "$RENEWED_LINEAGE/fullchain.pem" "$RENEWED_LINEAGE/privkey.pem"'
    - unless: test -e /etc/letsencrypt/live/{{ d }}/fullchain.pem
    - require:
      - file: chatmail-tls-acme-webroot
      - file: chatmail-tls-install-script
      - service: chatmail-web-service

chatmail-tls-acme-install:
  cmd.run:
    - name: {{ tls.install_script }} /etc/letsencrypt/live/{{ d }}/fullchain.pem /etc/letsencrypt/live/{{ d }}/privkey.pem
    - onlyif: test -e /etc/letsencrypt/live/{{ d }}/fullchain.pem
    - unless: cmp -s /etc/letsencrypt/live/{{ d }}/fullchain.pem {{ tls.cert }}
    - require:
      - cmd: chatmail-tls-acme-issue

chatmail-tls-acme-renew-service:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/chatmail-acme-renew.service
    - contents: |
        # Managed by Salt (chatmail formula).
        [Unit]
        Description=Renew the relay's ACME certificate (certbot)
        [Service]
        Type=oneshot
        ExecStart=/usr/bin/certbot renew --quiet
        {{ unit_limits("chatmail-acme-renew") | indent(8) }}
{%- endif %}

chatmail-tls-acme-renew-timer:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/chatmail-acme-renew.timer
    - contents: |
        # Managed by Salt (chatmail formula).
        [Unit]
        Description=Daily ACME certificate renewal check
        [Timer]
        OnCalendar=*-*-* 16:20:00
        RandomizedDelaySec=1h
        Persistent=true
        [Install]
        WantedBy=timers.target
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-tls-acme-renew-service
      - file: chatmail-tls-acme-renew-timer
  service.running:
    - name: chatmail-acme-renew.timer
    - enable: True
    - require:
      - module: chatmail-tls-acme-renew-timer
