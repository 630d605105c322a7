{#- Daily expiry: old messages, large old messages, inactive accounts, quota trim.
    A oneshot service started by a timer (Persistent: a missed run happens at boot). #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set paths = chatmail.paths %}
{%- set units = paths.systemd_units %}

include:
  - chatmail.chatmaild
{%- if chatmail.init != "systemd" %}

{#- No timers without systemd: the daily run is a cron job of the vmail user. #}
chatmail-expiry-cron:
  cron.present:
    - name: {{ paths.venv }}/bin/chatmail-expire {{ paths.ini }} --remove
    - user: {{ chatmail.users.vmail }}
    - identifier: chatmail-expire
    - minute: "{{ chatmail.expiry.cron_minute }}"
    - hour: "{{ chatmail.expiry.cron_hour }}"
    - require:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-chatmaild-ini
{%- else %}

chatmail-expiry-unit:
  file.managed:
    - name: {{ units }}/chatmail-expire.service
    - source: salt://chatmail/chatmaild/files/daemon.service.jinja
    - template: jinja
    - context:
        description: "chatmail expire: remove old mail and inactive accounts"
        exec_start: {{ paths.venv }}/bin/chatmail-expire {{ paths.ini }} --remove
        type: oneshot
        restart: false
        timer: true
        runtime_dir: ""
        read_write_paths: {{ [paths.mailboxes, paths.counters] | json }}
        protect_home: "no"
        wants_network: false
    - mode: "0644"
    - check_cmd: {{ paths.check_config }} unit chatmail-expire.service
    - require:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-checks-script

chatmail-expiry-timer:
  file.managed:
    - name: {{ units }}/chatmail-expire.timer
    - contents: |
        # Managed by Salt (chatmail formula).
        [Unit]
        Description=Daily chatmail expiry

        [Timer]
        OnCalendar={{ chatmail.expiry.on_calendar }}
        Persistent=true

        [Install]
        WantedBy=timers.target
    - mode: "0644"
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-expiry-unit
      - file: chatmail-expiry-timer
  service.running:
    - name: chatmail-expire.timer
    - enable: True
    - require:
      - module: chatmail-expiry-timer
      - file: chatmail-chatmaild-ini
{%- endif %}
