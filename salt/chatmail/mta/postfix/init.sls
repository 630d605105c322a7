{#- Postfix: ports 25/587/465, the filtermail proxies, reinjection (DKIM) and LMTP to
    Dovecot. main.cf and the regexp maps are applied with `postfix reload` (running
    smtpd processes finish their sessions); master.cf and the listening parameters
    restart Postfix, because they change which sockets exist. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set dir = chatmail.postfix.config_dir %}
{%- set dkim_milter = chatmail.dkim.enabled and chatmail.dkim.signer == "opendkim" %}

include:
  - chatmail.packages
  - chatmail.tls
  - chatmail.checks
  - chatmail.resolver
{%- if dkim_milter %}
  - chatmail.dkim
{%- endif %}

chatmail-mta-mailname:
  file.managed:
    - name: /etc/mailname
    - contents: {{ chatmail.address_domain | json }}
    - require:
      - pkg: chatmail-packages

{%- for map in ["login_map", "smtp_tls_policy_map"] %}

chatmail-mta-{{ map | replace("_", "-") }}:
  file.managed:
    - name: {{ dir }}/{{ map }}
    - source: salt://chatmail/mta/postfix/files/{{ map }}
    - mode: "0644"
    - require:
      - pkg: chatmail-packages
    - require_in:
      - file: chatmail-mta-main-cf
{%- endfor %}
{%- for map, stage in [("submission_header_cleanup", "submission"), ("lmtp_header_cleanup", "delivery")] %}

chatmail-mta-{{ map | replace("_", "-") }}:
  file.managed:
    - name: {{ dir }}/{{ map }}
    - source: salt://chatmail/mta/postfix/files/header_cleanup.jinja
    - template: jinja
    - context: {stage: {{ stage }}}
    - mode: "0644"
    - require:
      - pkg: chatmail-packages
    - require_in:
      - file: chatmail-mta-main-cf
{%- endfor %}

{#- postconf checks main.cf and master.cf as a pair. master.cf goes live first, checked
    against the main.cf about to follow (rendered here, outside Postfix's directory);
    then main.cf is checked against the new master.cf. #}
chatmail-mta-main-cf-candidate:
  file.managed:
    - name: {{ chatmail.postfix.candidate_dir }}/main.cf
    - source: salt://chatmail/mta/postfix/files/main.cf.jinja
    - template: jinja
    - makedirs: True
    - mode: "0644"

chatmail-mta-master-cf:
  file.managed:
    - name: {{ dir }}/master.cf
    - source: salt://chatmail/mta/postfix/files/master.cf.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: {{ chatmail.paths.check_config }} postfix-master {{ chatmail.postfix.candidate_dir }}/main.cf
    - require:
      - pkg: chatmail-packages
      - file: chatmail-mta-main-cf-candidate
      - file: chatmail-checks-script

chatmail-mta-main-cf:
  file.managed:
    - name: {{ dir }}/main.cf
    - source: salt://chatmail/mta/postfix/files/main.cf.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: {{ chatmail.paths.check_config }} postfix-main
    - require:
      - file: chatmail-mta-master-cf
      - sls: chatmail.tls

{#- The main.cf parameters that need a restart rather than a reload (postconf(5):
    "stop and start Postfix when this parameter changes"). #}
chatmail-mta-restart-keys:
  file.managed:
    - name: {{ dir }}/chatmail-restart-keys
    - contents: |
        # Managed by Salt: a change here restarts Postfix.
        inet_interfaces = all
        inet_protocols = {{ "all" if chatmail.ipv6 else "ipv4" }}
    - require:
      - pkg: chatmail-packages

chatmail-mta-restart-dropin:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/{{ chatmail.postfix.instance_unit }}.d/10-chatmail-restart.conf
    - makedirs: True
    - contents: |
        # Managed by Salt (chatmail formula): Postfix comes back after a crash.
        [Service]
        Restart=always
        RestartSec=30
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-mta-restart-dropin

chatmail-mta-service:
  service.running:
    - name: {{ chatmail.service.postfix }}
    - enable: True
    - require:
      - file: chatmail-mta-main-cf
      - file: chatmail-mta-mailname
{%- if dkim_milter %}
      - service: chatmail-dkim-service
{%- endif %}
    - watch:
{%- if dkim_milter %}
      # a new group membership (opendkim, for the milter socket) needs new processes
      - group: chatmail-dkim-postfix-group
{%- endif %}
      - file: chatmail-mta-master-cf
      - file: chatmail-mta-restart-keys
      - module: chatmail-mta-restart-dropin

chatmail-mta-reload:
  cmd.run:
    - name: postfix reload
    # right after a restart (master.cf changed too) the master may not be up yet
    - retry: {attempts: 5, interval: 2}
    - onchanges:
      - file: chatmail-mta-main-cf
      - file: chatmail-mta-login-map
      - file: chatmail-mta-submission-header-cleanup
      - file: chatmail-mta-lmtp-header-cleanup
      - file: chatmail-mta-smtp-tls-policy-map
    - require:
      - service: chatmail-mta-service

{#- Chrooted services (master.cf) resolve through the queue directory's copy of
    resolv.conf, which Debian's postfix@ unit refreshes only when Postfix starts; the
    resolver state points /etc/resolv.conf at unbound at the very end of the run, after
    Postfix started. New smtp processes read the copy, so no restart is needed. #}
{%- set chroot_resolv_conf = chatmail.postfix.queue_directory ~ "/etc/resolv.conf" %}
chatmail-mta-chroot-resolv-conf:
  cmd.run:
    - name: install -D -m 0644 {{ chatmail.resolver.resolv_conf }} {{ chroot_resolv_conf }}
    - unless: cmp -s {{ chatmail.resolver.resolv_conf }} {{ chroot_resolv_conf }}
    - order: last
    - require:
      - file: chatmail-resolver-resolv-conf
      - service: chatmail-mta-service
