{#- TLS certificate for Postfix, Dovecot and nginx, by chatmail.tls.mode:
    self      generated once (SANs: domain, mta-sts., www.) and kept;
    external  the operator's files, checked to exist; a path unit reloads on change;
    acme      a self-signed stand-in at the same paths until the ACME client (acmetool or
              certbot, http-01 through nginx port 80) installs the real one via its hook. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/files/limits.jinja" import unit_limits with context %}
{%- set tls = chatmail.tls %}
{%- set d = chatmail.mail_domain %}

include:
  - chatmail.packages
{%- if tls.mode == "acme" %}
  {#- OpenBSD's acme-client has its own flow; acmetool and certbot share chatmail.tls.acme #}
  - chatmail.tls.{{ "acme-client" if tls.acme_client == "acme-client" else "acme" }}
{%- endif %}

{%- if tls.mode in ["self", "acme"] %}

chatmail-tls-selfsigned:
  cmd.run:
    - name: >-
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc
        -days 36500 -keyout {{ tls.key }} -out {{ tls.cert }} -subj /CN={{ d }}
        -addext basicConstraints=critical,CA:FALSE
        -addext extendedKeyUsage=serverAuth,clientAuth
{%- if chatmail.ip_relay %}
        -addext subjectAltName=IP:{{ d }}
{%- else %}
        -addext subjectAltName=DNS:{{ d }},DNS:www.{{ d }},DNS:mta-sts.{{ d }}
{%- endif %}
    - umask: "077"
    - creates: {{ tls.cert }}
    - require:
      - pkg: chatmail-packages

chatmail-tls-cert-mode:
  file.managed:
    - name: {{ tls.cert }}
    - mode: "0644"
    - replace: False
    - require:
      - cmd: chatmail-tls-selfsigned

{%- else %}

chatmail-tls-external-cert:
  file.exists:
    - name: {{ tls.cert }}

chatmail-tls-external-key:
  file.exists:
    - name: {{ tls.key }}

chatmail-tls-reload-service:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/chatmail-tls-reload.service
    - contents: |
        # Managed by Salt (chatmail formula).
        [Unit]
        Description=Reload the mail and web daemons after the TLS certificate changed
        [Service]
        Type=oneshot
        ExecStart=/bin/systemctl try-reload-or-restart {{ chatmail.service.dovecot }} {{ chatmail.service.nginx }} {{ chatmail.service.postfix }}
        {{ unit_limits("chatmail-tls-reload") | indent(8) }}

chatmail-tls-reload-path:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/chatmail-tls-reload.path
    - contents: |
        # Managed by Salt (chatmail formula). inotify does not see changes made through
        # a bind mount: then run `systemctl start chatmail-tls-reload.service` yourself.
        [Unit]
        Description=Watch the external TLS certificate
        [Path]
        PathChanged={{ tls.cert }}
        PathChanged={{ tls.key }}
        [Install]
        WantedBy=multi-user.target
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-tls-reload-service
      - file: chatmail-tls-reload-path
  service.running:
    - name: chatmail-tls-reload.path
    - enable: True
    - require:
      - module: chatmail-tls-reload-path
      - file: chatmail-tls-external-cert
      - file: chatmail-tls-external-key
{%- endif %}
